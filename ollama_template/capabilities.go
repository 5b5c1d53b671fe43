package main

// The capability rules of server/images.go for a Go TEMPLATE, which that package keeps unexported. The facts
// they test come from Ollama's exported code: Template.Vars and thinking.InferTags.

import (
	"slices"
	"strings"

	"github.com/ollama/ollama/template"
	"github.com/ollama/ollama/thinking"
	modelcaps "github.com/ollama/ollama/types/model"
)

// templateCapabilities follows goTemplateCapabilities: tools when the TEMPLATE uses .Tools, insert when it
// uses .Suffix, thinking when InferTags finds both tags. Ollama adds completion from the GGUF (any model
// without a pooling type), so `ollama run --think` is accepted exactly when thinking is in this list (for a
// model without a PARSER).
func templateCapabilities(t *template.Template) []modelcaps.Capability {
	vars, err := t.Vars()
	if err != nil {
		return nil
	}
	var caps []modelcaps.Capability
	if slices.Contains(vars, "tools") {
		caps = append(caps, modelcaps.CapabilityTools)
	}
	if slices.Contains(vars, "suffix") {
		caps = append(caps, modelcaps.CapabilityInsert)
	}
	if open, close := thinking.InferTags(t.Template); open != "" && close != "" {
		caps = append(caps, modelcaps.CapabilityThinking)
	}
	return caps
}

// hasToolRoundTrip follows goTemplateHasToolRoundTrip: the TEMPLATE uses .Tools and .ToolCalls and its text
// shows a tool result. From v0.30, when the GGUF also carries a Jinja chat template, a Go TEMPLATE with a
// round trip is used unless the Jinja template has more capabilities and a round trip of its own
// (shouldPreferChatTemplate).
func hasToolRoundTrip(t *template.Template) bool {
	vars, err := t.Vars()
	if err != nil || !slices.Contains(vars, "tools") || !slices.Contains(vars, "toolcalls") {
		return false
	}
	raw := t.String()
	return strings.Contains(raw, `eq .Role "tool"`) || strings.Contains(raw, "tool_response") ||
		strings.Contains(raw, "TOOL_RESULTS")
}
