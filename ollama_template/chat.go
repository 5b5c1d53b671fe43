package main

// What Ollama's server does with an /api/chat request before and after the model runs, for a model without a
// RENDERER or PARSER (ours). The server package keeps these steps unexported, so they are restated here, one
// function per step, each naming the Ollama function it follows; everything else is Ollama's own code
// (template.Execute, thinking.Parser, api's types). Left out: scheduling, the truncation to num_ctx in
// server/prompt.go chatPrompt (it drops the oldest non-system messages only when the prompt does not fit) and
// images.

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/template"
	"github.com/ollama/ollama/thinking"
	modelcaps "github.com/ollama/ollama/types/model"
)

// model is the part of a created model (server/images.go Model) that a chat uses: the TEMPLATE as
// template.Parse returns it, SYSTEM, the MESSAGE lines, and the family `ollama create` reads from the GGUF's
// general.architecture.
type model struct {
	Template *template.Template
	System   string
	Messages []api.Message
	Family   string
}

// chatPrompt is the prompt ChatHandler (server/routes.go) sends to the model for req, and the think value
// it was rendered with.
func chatPrompt(m model, req api.ChatRequest) (string, *api.ThinkValue, error) {
	think, err := defaultThink(m, req.Model, req.Think)
	if err != nil {
		return "", nil, err
	}
	if len(req.Messages) == 0 {
		return "", nil, errors.New("no messages: Ollama only loads the model and renders no prompt")
	}
	msgs := dropEarlierThinking(m.Family, withModelfileMessages(m, req.Messages))
	prompt, err := renderPrompt(m.Template, msgs, req.Tools, think)
	return prompt, think, err
}

// defaultThink follows ChatHandler's capability check (server/routes.go): a model with the thinking
// capability thinks unless the request says otherwise, and asking any other model to think is an error
// (HTTP 400). The TEMPLATE's capabilities stand for the model's here: with no PARSER, nothing else adds
// thinking.
func defaultThink(m model, name string, think *api.ThinkValue) (*api.ThinkValue, error) {
	if slices.Contains(templateCapabilities(m.Template), modelcaps.CapabilityThinking) {
		if think == nil {
			return &api.ThinkValue{Value: true}, nil
		}
		return think, nil
	}
	if think.Bool() {
		return nil, fmt.Errorf("%q does not support thinking", name)
	}
	return think, nil
}

// withModelfileMessages follows ChatHandler's assembly of the conversation: the Modelfile's MESSAGE lines,
// then the request's messages, and SYSTEM in front of both only when the request's own first message is not
// a system message (a system MESSAGE line does not count).
func withModelfileMessages(m model, req []api.Message) []api.Message {
	msgs := append(slices.Clone(m.Messages), req...)
	if req[0].Role != "system" && m.System != "" {
		msgs = append([]api.Message{{Role: "system", Content: m.System}}, msgs...)
	}
	return msgs
}

// dropEarlierThinking follows filterThinkTags (server/routes.go): in the qwen3 family, each assistant message
// before the last user message keeps only the content a thinking.Parser on <think> and </think> lets through,
// so a <think> block left in earlier content is not sent again. (Ollama also does this for a model named
// deepseek-r1; here only the family is known.)
func dropEarlierThinking(family string, msgs []api.Message) []api.Message {
	if family != "qwen3" {
		return msgs
	}
	lastUser := -1
	for i, msg := range msgs {
		if msg.Role == "user" {
			lastUser = i
		}
	}
	for i := range max(lastUser, 0) {
		if msgs[i].Role == "assistant" {
			p := thinking.Parser{OpeningTag: "<think>", ClosingTag: "</think>"}
			_, msgs[i].Content = p.AddContent(msgs[i].Content)
		}
	}
	return msgs
}

// renderPrompt follows renderPrompt (server/prompt.go) for a model without a RENDERER: the think value
// reaches the template as Think (on or off), ThinkLevel (ThinkValue.String: "medium" for a plain true, ""
// for false) and IsThinkSet (whether anything set it, the default above included).
func renderPrompt(
	t *template.Template, msgs []api.Message, tools api.Tools, think *api.ThinkValue,
) (string, error) {
	var b strings.Builder
	err := t.Execute(&b, template.Values{
		Messages:   msgs,
		Tools:      tools,
		Think:      think.Bool(),
		ThinkLevel: think.String(),
		IsThinkSet: think != nil,
	})
	return b.String(), err
}

// outputThinkingParser follows ChatHandler after rendering: when the model thinks and the TEMPLATE gives
// thinking tags, generated text is split by a thinking.Parser on those tags, fed the opening tag first when
// the prompt already ends with it (the model then starts inside the thinking block). nil: nothing is split.
func outputThinkingParser(t *template.Template, prompt string, think *api.ThinkValue) *thinking.Parser {
	open, close := thinking.InferTags(t.Template)
	if !think.Bool() || open == "" || close == "" {
		return nil
	}
	p := &thinking.Parser{OpeningTag: open, ClosingTag: close}
	if strings.HasSuffix(strings.TrimSpace(prompt), open) {
		p.AddContent(open)
	}
	return p
}
