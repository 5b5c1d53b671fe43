package main

import (
	"strings"
	"testing"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/template"
)

// probe prints what the template sees. thinkingProbe also gives the thinking capability: InferTags finds <t>
// and </t> around .Thinking inside the range over .Messages.
const (
	probe         = `{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}`
	thinkingProbe = probe + `{{ range .Messages }}{{ if .Thinking }}<t>{{ .Thinking }}</t>{{ end }}{{ end }}`
)

func testModel(t *testing.T, text string) model {
	t.Helper()
	tmpl, err := template.Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	return model{Template: tmpl, Family: "qwen3"}
}

func user(s string) api.Message { return api.Message{Role: "user", Content: s} }

func render(t *testing.T, m model, think *api.ThinkValue, msgs ...api.Message) string {
	t.Helper()
	prompt, _, err := chatPrompt(m, api.ChatRequest{Model: "m", Messages: msgs, Think: think})
	if err != nil {
		t.Fatal(err)
	}
	return prompt
}

func TestThinkDefaultsOnForThinkingModels(t *testing.T) {
	m := testModel(t, thinkingProbe)
	for _, tc := range []struct {
		think *api.ThinkValue
		want  string
	}{
		{nil, "true|medium|true|"},
		{&api.ThinkValue{Value: true}, "true|medium|true|"},
		{&api.ThinkValue{Value: false}, "false||true|"},
		{&api.ThinkValue{Value: "high"}, "true|high|true|"},
	} {
		if got := render(t, m, tc.think, user("q")); !strings.HasPrefix(got, tc.want) {
			t.Errorf("think %v: got %q, want prefix %q", tc.think, got, tc.want)
		}
	}
}

func TestThinkIsRefusedWithoutTheCapability(t *testing.T) {
	m := testModel(t, probe)
	if got := render(t, m, nil, user("q")); got != "false||false|user=q;" {
		t.Errorf("unset: got %q", got)
	}
	if got := render(t, m, &api.ThinkValue{Value: false}, user("q")); got != "false||true|user=q;" {
		t.Errorf("false: got %q", got)
	}
	_, _, err := chatPrompt(m, api.ChatRequest{Model: "m", Messages: []api.Message{user("q")}, Think: &api.ThinkValue{Value: true}})
	if err == nil || err.Error() != `"m" does not support thinking` {
		t.Errorf("true: got error %v", err)
	}
}

func TestModelfileMessagesComeFirstAndSystemOnlyWithoutARequestSystem(t *testing.T) {
	m := testModel(t, probe)
	m.System = "S"
	m.Messages = []api.Message{{Role: "system", Content: "M0"}, {Role: "assistant", Content: "M1"}}
	// The request opens with a user message: SYSTEM goes first even though a MESSAGE line is a system message
	// (template.Execute then merges the two neighbouring system messages).
	if got := render(t, m, nil, user("q")); got != "false||false|system=S\n\nM0;assistant=M1;user=q;" {
		t.Errorf("user first: got %q", got)
	}
	// The request opens with its own system message: no SYSTEM.
	got := render(t, m, nil, api.Message{Role: "system", Content: "R"}, user("q"))
	if got != "false||false|system=M0;assistant=M1;system=R;user=q;" {
		t.Errorf("system first: got %q", got)
	}
}

func TestEarlierThinkingIsDroppedForQwen3Only(t *testing.T) {
	msgs := func() []api.Message {
		return []api.Message{
			user("q1"),
			{Role: "assistant", Content: "<think>\nold\n</think>\n\nA1"},
			user("q2"),
			{Role: "assistant", Content: "<think>new</think>A2"},
		}
	}
	m := testModel(t, probe)
	want := "false||false|user=q1;assistant=A1;user=q2;assistant=<think>new</think>A2;"
	if got := render(t, m, nil, msgs()...); got != want {
		t.Errorf("qwen3: got %q", got)
	}
	m.Family = "llama"
	want = "false||false|user=q1;assistant=<think>\nold\n</think>\n\nA1;user=q2;assistant=<think>new</think>A2;"
	if got := render(t, m, nil, msgs()...); got != want {
		t.Errorf("llama: got %q", got)
	}
}

func TestOutputIsSplitOnlyWhenThinking(t *testing.T) {
	m := testModel(t, thinkingProbe)
	on := &api.ThinkValue{Value: true}
	// The prompt ends with the opening tag: the model's text starts inside the thinking block.
	p := outputThinkingParser(m.Template, "...<t>\n", on)
	if thinking, content := p.AddContent("r</t>\n\nanswer"); thinking != "r" || content != "answer" {
		t.Errorf("prefilled: got %q, %q", thinking, content)
	}
	p = outputThinkingParser(m.Template, "...", on)
	if thinking, content := p.AddContent("<t>r</t>answer"); thinking != "r" || content != "answer" {
		t.Errorf("generated tag: got %q, %q", thinking, content)
	}
	if outputThinkingParser(m.Template, "...", &api.ThinkValue{Value: false}) != nil {
		t.Error("think false: want no parser")
	}
	if outputThinkingParser(testModel(t, probe).Template, "...", on) != nil {
		t.Error("no thinking tags: want no parser")
	}
}

func TestTemplateCapabilities(t *testing.T) {
	for text, want := range map[string]string{
		probe:                          "",
		thinkingProbe:                  "thinking",
		probe + "{{ .Tools }}":         "tools",
		probe + "{{ .Suffix }}":        "insert",
		thinkingProbe + "{{ .Tools }}": "tools,thinking",
	} {
		var got []string
		for _, c := range templateCapabilities(testModel(t, text).Template) {
			got = append(got, string(c))
		}
		if strings.Join(got, ",") != want {
			t.Errorf("%s: got %v, want %s", text, got, want)
		}
	}
	roundTrip := `{{ range .Tools }}{{ end }}{{ range .Messages }}{{ .ToolCalls }}{{ if eq .Role "tool" }}r{{ end }}{{ end }}`
	if !hasToolRoundTrip(testModel(t, roundTrip).Template) {
		t.Error("round trip not found")
	}
	if hasToolRoundTrip(testModel(t, probe+"{{ .Tools }}").Template) {
		t.Error("round trip found in a template without .ToolCalls")
	}
}
