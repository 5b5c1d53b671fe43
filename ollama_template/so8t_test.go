package main

// Our Modelfile through Ollama's own code: parser, template, thinking and tools.

import (
	"bytes"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/parser"
	"github.com/ollama/ollama/template"
	"github.com/ollama/ollama/tools"
	modelcaps "github.com/ollama/ollama/types/model"
)

// so8tModel is the model `ollama create` makes from the Modelfile so8t_export writes.
// tests/test_ollama_template.py passes that Modelfile's path in SO8T_MODELFILE; without it, the test asks
// so8t_export for the text.
func so8tModel(t *testing.T) model {
	t.Helper()
	var data []byte
	var err error
	if path := os.Getenv("SO8T_MODELFILE"); path != "" {
		data, err = os.ReadFile(path)
	} else {
		python := os.Getenv("PYTHON")
		if python == "" {
			python = "python3"
		}
		cmd := exec.Command(python, "-c", "import sys; from so8t_export.modelfile import render_modelfile; "+
			"sys.stdout.write(render_modelfile('so8t.gguf', 'so8t.Modelfile'))")
		cmd.Dir = ".."
		cmd.Stderr = os.Stderr
		data, err = cmd.Output()
	}
	if err != nil {
		t.Fatalf("our Modelfile (set SO8T_MODELFILE to its path): %v", err)
	}
	mf, err := parser.ParseFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	req, err := mf.CreateRequest(noFilesDir)
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := template.Parse(req.Template)
	if err != nil {
		t.Fatal(err)
	}
	return model{Template: tmpl, System: req.System, Messages: req.Messages, Family: "qwen3"}
}

func TestSO8TTemplateGivesThinkingAndTools(t *testing.T) {
	m := so8tModel(t)
	caps := templateCapabilities(m.Template)
	if !slices.Equal(caps, []modelcaps.Capability{modelcaps.CapabilityTools, modelcaps.CapabilityThinking}) {
		t.Fatalf("capabilities %v, want tools and thinking", caps)
	}
	res, err := inspect(m.Template)
	if err != nil {
		t.Fatal(err)
	}
	if res.ThinkingOpen != "<think>" || res.ThinkingClose != "</think>" {
		t.Errorf("thinking tags %q %q", res.ThinkingOpen, res.ThinkingClose)
	}
	if res.ToolParserTag != "<tool_call>" || !res.ToolRoundTrip {
		t.Errorf("tool parser tag %q, round trip %v", res.ToolParserTag, res.ToolRoundTrip)
	}
	// `ollama run --think` (and --think=high) is accepted.
	for _, v := range []any{true, "high"} {
		if _, err := defaultThink(m, "so8t", &api.ThinkValue{Value: v}); err != nil {
			t.Errorf("think %v: %v", v, err)
		}
	}
}

func TestSO8TGeneratedThinkingIsSplitFromTheAnswer(t *testing.T) {
	m := so8tModel(t)
	req := api.ChatRequest{Messages: []api.Message{{Role: "user", Content: "What is 2 + 2?"}}}
	prompt, think, err := chatPrompt(m, req)
	if err != nil {
		t.Fatal(err)
	}
	if !think.Bool() || !strings.HasSuffix(prompt, "<|im_start|>assistant\n<think>\n") {
		t.Fatalf("think %v, prompt ends %q", think, prompt[max(0, len(prompt)-40):])
	}
	// The model writes on after "<think>\n"; fed whole, or token by token as it streams.
	const output = "2 + 2 is 4.\n</think>\n\nThe answer is 4."
	for _, size := range []int{len(output), 3, 1} {
		p := outputThinkingParser(m.Template, prompt, think)
		var thinking, content strings.Builder
		for i := 0; i < len(output); i += size {
			th, c := p.AddContent(output[i:min(i+size, len(output))])
			thinking.WriteString(th)
			content.WriteString(c)
		}
		if thinking.String() != "2 + 2 is 4.\n" || content.String() != "The answer is 4." {
			t.Errorf("chunks of %d: thinking %q, content %q", size, thinking.String(), content.String())
		}
	}
	// With think false nothing is split: the text is all content.
	req.Think = &api.ThinkValue{Value: false}
	prompt, think, err = chatPrompt(m, req)
	if err != nil {
		t.Fatal(err)
	}
	if outputThinkingParser(m.Template, prompt, think) != nil {
		t.Error("think false: the output would be split")
	}
}

func TestSO8TToolCallIsParsed(t *testing.T) {
	m := so8tModel(t)
	fn := api.ToolFunction{Name: "get_time", Description: "Local time"}
	fn.Parameters.Type = "object"
	p := tools.NewParser(m.Template.Template, []api.Tool{{Type: "function", Function: fn}})
	calls, content := p.Add("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>")
	if len(calls) != 1 || calls[0].Function.Name != "get_time" || content != "" {
		t.Errorf("calls %v, content %q", calls, content)
	}
}
