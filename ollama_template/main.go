// Command ollama_template asks Ollama's own Go packages (github.com/ollama/ollama at the version go.mod
// requires, the Dockerfile's tag) what they make of a Modelfile and of a chat TEMPLATE, so tests can check
// our Modelfile and prompts against Ollama without an Ollama server. It needs no cgo: Ollama's parser,
// template, thinking, tools and api packages are pure Go. The few steps of the server's chat handler that
// Ollama does not export are in chat.go and capabilities.go, each naming the Ollama function it follows.
//
// Two ways to call it:
//
//	ollama_template modelfile FILE...
//
// prints one JSON line per file with Ollama's verdict on it (see modelfile.go for the fields).
//
//	ollama_template < request.json
//
// reads one JSON object on stdin:
//
//	{
//	  "mode":   "render" (default), "split" or "inspect",
//	  "model":  {"template": "...", "system": "...", "messages": [...]},
//	  "family": "qwen3" (default; the GGUF's general.architecture, which Ollama stores as the model family),
//	  "chat":   {"messages": [...], "tools": [...], "think": true | false | "high" | absent},
//	  "output": "<text the model generated after that prompt>" (split only)
//	}
//
// "model" is the api.CreateRequest a Modelfile turns into (the "request" that `modelfile` prints can be
// passed as it is): its TEMPLATE, SYSTEM and MESSAGE lines. "chat" is an /api/chat request body, decoded into
// Ollama's api.ChatRequest, so messages, tools and think use Ollama's JSON names ("role", "content", "thinking",
// "tool_calls": [{"function": {"index", "name", "arguments"}}], ...) and Ollama's decoding (roles lowercased,
// tool arguments kept in their order).
//
// "render" prints the prompt Ollama's server would send to the model for that chat, with no newline added.
// "split" prints {"thinking": ..., "content": ...}: how the server splits "output" for that chat.
// "inspect" prints, as JSON, what Ollama derives from the TEMPLATE alone (see inspect below).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/template"
	"github.com/ollama/ollama/thinking"
	"github.com/ollama/ollama/tools"
)

type input struct {
	Mode   string            `json:"mode"`
	Model  api.CreateRequest `json:"model"`
	Family *string           `json:"family"`
	Chat   api.ChatRequest   `json:"chat"`
	Output string            `json:"output"`
}

// inspection is what Ollama derives from a TEMPLATE on its own: its identifiers (Template.Vars); whether
// Execute feeds it .Messages rather than the legacy .Prompt and .Response; its share of the model's
// capabilities; the tags the thinking parser splits on (thinking.InferTags); the text the tool-call parser
// waits for (tools.Parser.Tag); whether it counts as rendering tool calls and their results.
type inspection struct {
	Vars          []string `json:"vars"`
	MessagesMode  bool     `json:"messages_mode"`
	Capabilities  []string `json:"capabilities"`
	ThinkingOpen  string   `json:"thinking_open"`
	ThinkingClose string   `json:"thinking_close"`
	ToolParserTag string   `json:"tool_parser_tag"`
	ToolRoundTrip bool     `json:"tool_round_trip"`
}

func inspect(t *template.Template) (inspection, error) {
	vars, err := t.Vars()
	if err != nil {
		return inspection{}, err
	}
	open, close := thinking.InferTags(t.Template)
	res := inspection{
		Vars:          vars,
		MessagesMode:  slices.Contains(vars, "messages"),
		Capabilities:  []string{},
		ThinkingOpen:  open,
		ThinkingClose: close,
		ToolParserTag: tools.NewParser(t.Template, nil).Tag(),
		ToolRoundTrip: hasToolRoundTrip(t),
	}
	for _, c := range templateCapabilities(t) {
		res.Capabilities = append(res.Capabilities, string(c))
	}
	return res, nil
}

func runStdin(stdin io.Reader, stdout io.Writer) error {
	var in input
	if err := json.NewDecoder(stdin).Decode(&in); err != nil {
		return fmt.Errorf("bad input JSON: %w", err)
	}
	t, err := template.Parse(in.Model.Template)
	if err != nil {
		return fmt.Errorf("template error: %w", err)
	}
	family := "qwen3"
	if in.Family != nil {
		family = *in.Family
	}
	m := model{Template: t, System: in.Model.System, Messages: in.Model.Messages, Family: family}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	switch in.Mode {
	case "", "render":
		prompt, _, err := chatPrompt(m, in.Chat)
		if err != nil {
			return err
		}
		_, err = io.WriteString(stdout, prompt)
		return err
	case "split":
		prompt, think, err := chatPrompt(m, in.Chat)
		if err != nil {
			return err
		}
		split := struct {
			Thinking string `json:"thinking"`
			Content  string `json:"content"`
		}{Content: in.Output}
		if p := outputThinkingParser(t, prompt, think); p != nil {
			split.Thinking, split.Content = p.AddContent(in.Output)
		}
		return enc.Encode(split)
	case "inspect":
		res, err := inspect(t)
		if err != nil {
			return fmt.Errorf("template error: %w", err)
		}
		return enc.Encode(res)
	default:
		return fmt.Errorf("unknown mode %q (want render, split or inspect)", in.Mode)
	}
}

func main() {
	var err error
	if len(os.Args) > 1 && os.Args[1] == "modelfile" {
		err = runModelfile(os.Args[2:], os.Stdout)
	} else if len(os.Args) > 1 {
		err = errors.New("usage: ollama_template [modelfile FILE...] (no arguments: a JSON request on stdin)")
	} else {
		err = runStdin(os.Stdin, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ollama_template:", err)
		os.Exit(1)
	}
}
