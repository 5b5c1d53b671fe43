// Command ollama_template renders an Ollama chat TEMPLATE the way the Ollama server (0.32, the version
// so8t_export pins) does before a chat request reaches the model, using only Go's standard library. Tests run
// it to compare Ollama's prompt with the Hugging Face chat template's without an Ollama binary.
//
// It reads one JSON object on stdin:
//
//	{
//	  "template": "<Go template text, as in the Modelfile's TEMPLATE>",
//	  "mode": "render" (default) or "inspect",
//	  "family": "qwen3" (default; the model family from general.architecture),
//	  "data": {
//	    "System": "<the Modelfile's SYSTEM, if any>",
//	    "Messages": [{"Role": "", "Content": "", "Thinking": "",
//	                  "ToolCalls": [{"ID": "", "Function": {"Index": 0, "Name": "", "Arguments": {}}}],
//	                  "ToolName": "", "ToolCallID": ""}],
//	    "Tools": [<tools in Ollama's API JSON: {"type": "function", "function": {"name", "description", "parameters"}}>],
//	    "Think": false, "IsThinkSet": false, "ThinkLevel": "", "Response": ""
//	  }
//	}
//
// Field names match case-insensitively (Go's encoding/json), so "role" works as well as "Role".
//
// "render" prints the prompt, with no trailing newline added. On the way it does what Ollama does:
//   - the chat handler (server/routes.go) prepends System as a system message unless the first message is
//     one, lowercases roles, and for the qwen3 family strips <think>...</think> from the content of
//     assistant messages before the last user message (filterThinkTags);
//   - template.Execute collates the messages (all system contents joined with "\n\n" into .System while they
//     also stay in .Messages; consecutive messages of one role, except tool, merged into the first with
//     "\n\n", which keeps only the first one's other fields), converts them into Ollama's template types
//     (tool-call Arguments, .Tools and tool properties print as compact JSON through String() methods) and
//     executes the template with Option("missingkey=zero") and Ollama's functions (json, currentDate,
//     yesterdayDate, toTypeScriptType). Data.Response is ignored: Ollama passes "" in messages mode.
//
// Only messages-mode templates (ones that mention .Messages) are supported; legacy .Prompt/.Response
// templates exit with an error.
//
// "inspect" prints what Ollama derives from the template itself: its identifiers (Template.Vars), the
// thinking tags (thinking.InferTags) and the capabilities they give, the tool-call start tag its tool parser
// looks for (tools.parseTag), and whether it counts as having a tool round trip (server/images.go).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
	"unicode"
)

// ---------------------------------------------------------------------------------------------------------
// Input: Ollama's API shapes
// ---------------------------------------------------------------------------------------------------------

type inToolCall struct {
	ID       string
	Function struct {
		Index     int
		Name      string
		Arguments map[string]any
	}
}

type inMessage struct {
	Role       string
	Content    string
	Thinking   string
	ToolCalls  []inToolCall
	ToolName   string
	ToolCallID string
}

// propertyType is api.PropertyType: one type marshals as a string, several as an array.
type propertyType []string

func (pt *propertyType) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt propertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

// toolProperty is api.ToolProperty: JSON-schema keywords it has no field for are dropped, as in Ollama.
type toolProperty struct {
	AnyOf       []toolProperty     `json:"anyOf,omitempty"`
	Type        propertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *orderedProperties `json:"properties,omitempty"`
}

// orderedProperties is api.ToolPropertiesMap: nested properties keep their insertion order.
type orderedProperties struct {
	keys   []string
	values map[string]toolProperty
}

func (o *orderedProperties) UnmarshalJSON(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return errors.New("properties must be a JSON object")
	}
	o.values = map[string]toolProperty{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key := tok.(string)
		var p toolProperty
		if err := dec.Decode(&p); err != nil {
			return err
		}
		if _, dup := o.values[key]; !dup {
			o.keys = append(o.keys, key)
		}
		o.values[key] = p
	}
	_, err = dec.Token()
	return err
}

func (o orderedProperties) MarshalJSON() ([]byte, error) {
	if o.values == nil {
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(o.values[k])
		if err != nil {
			return nil, err
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (o *orderedProperties) toMap() map[string]toolProperty {
	if o == nil || o.values == nil {
		return nil
	}
	m := make(map[string]toolProperty, len(o.values))
	for k, v := range o.values {
		m[k] = v
	}
	return m
}

type apiTool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description,omitempty"`
		Parameters  struct {
			Type       string             `json:"type"`
			Defs       any                `json:"$defs,omitempty"`
			Items      any                `json:"items,omitempty"`
			Required   []string           `json:"required,omitempty"`
			Properties *orderedProperties `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type inData struct {
	System     string
	Messages   []inMessage
	Tools      []apiTool
	Think      bool
	IsThinkSet bool
	ThinkLevel *string
	Response   string
}

type input struct {
	Template string  `json:"template"`
	Mode     string  `json:"mode"`
	Family   *string `json:"family"`
	Data     inData  `json:"data"`
}

// ---------------------------------------------------------------------------------------------------------
// What templates see: Ollama's template/template.go types
// ---------------------------------------------------------------------------------------------------------

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

type templateProperties map[string]toolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

// templateToolFunction has no String() method (as in Ollama since v0.14): {{ .Function }} prints Go struct
// syntax, {{ json .Function }} prints JSON.
type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateTools []templateTool

func (t templateTools) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     [][]byte
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

func convertTools(tools []apiTool) templateTools {
	if tools == nil {
		return nil
	}
	out := make(templateTools, len(tools))
	for i, t := range tools {
		p := t.Function.Parameters
		out[i] = templateTool{
			Type:  t.Type,
			Items: t.Items,
			Function: templateToolFunction{
				Name:        t.Function.Name,
				Description: t.Function.Description,
				Parameters: templateToolFunctionParameters{
					Type:       p.Type,
					Defs:       p.Defs,
					Items:      p.Items,
					Required:   p.Required,
					Properties: templateProperties(p.Properties.toMap()),
				},
			},
		}
	}
	return out
}

func convertMessages(msgs []*inMessage) []*templateMessage {
	if msgs == nil {
		return nil
	}
	out := make([]*templateMessage, len(msgs))
	for i, m := range msgs {
		var calls []templateToolCall
		for _, tc := range m.ToolCalls {
			calls = append(calls, templateToolCall{
				ID: tc.ID,
				Function: templateToolCallFunction{
					Index:     tc.Function.Index,
					Name:      tc.Function.Name,
					Arguments: templateArgs(tc.Function.Arguments),
				},
			})
		}
		out[i] = &templateMessage{
			Role:       m.Role,
			Content:    m.Content,
			Thinking:   m.Thinking,
			ToolCalls:  calls,
			ToolName:   m.ToolName,
			ToolCallID: m.ToolCallID,
		}
	}
	return out
}

// ---------------------------------------------------------------------------------------------------------
// The chat handler's message preparation and template.collate
// ---------------------------------------------------------------------------------------------------------

// stripThink gives the content Ollama's thinking parser leaves after a leading <think>...</think> block.
func stripThink(content string) string {
	const open, close = "<think>", "</think>"
	trimmed := strings.TrimLeftFunc(content, unicode.IsSpace)
	if strings.HasPrefix(trimmed, open) {
		after := trimmed[len(open):]
		if i := strings.Index(after, close); i >= 0 {
			return strings.TrimLeftFunc(after[i+len(close):], unicode.IsSpace)
		}
		return "" // an unterminated block: all of it is thinking
	}
	if trimmed == "" || strings.HasPrefix(open, trimmed) {
		return "" // the parser is still waiting to see whether a tag starts
	}
	return content
}

func prepareMessages(d inData, family string) []inMessage {
	msgs := make([]inMessage, len(d.Messages))
	copy(msgs, d.Messages)
	for i := range msgs {
		msgs[i].Role = strings.ToLower(msgs[i].Role)
	}
	if len(msgs) > 0 && msgs[0].Role != "system" && d.System != "" {
		msgs = append([]inMessage{{Role: "system", Content: d.System}}, msgs...)
	}
	if family == "qwen3" {
		lastUser := -1
		for i, m := range msgs {
			if m.Role == "user" {
				lastUser = i
			}
		}
		for i := range msgs {
			if msgs[i].Role == "assistant" && i < lastUser {
				msgs[i].Content = stripThink(msgs[i].Content)
			}
		}
	}
	return msgs
}

func collate(msgs []inMessage) (string, []*inMessage) {
	var system []string
	var collated []*inMessage
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// ---------------------------------------------------------------------------------------------------------
// template.Parse and its functions
// ---------------------------------------------------------------------------------------------------------

func toTypeScript(t string) string {
	switch t {
	case "string":
		return "string"
	case "number", "integer":
		return "number"
	case "boolean":
		return "boolean"
	case "array":
		return "any[]"
	case "object":
		return "Record<string, any>"
	case "null":
		return "null"
	}
	return "any"
}

func (p toolProperty) typeScriptType() string {
	if len(p.AnyOf) > 0 {
		var ts []string
		for _, a := range p.AnyOf {
			ts = append(ts, a.typeScriptType())
		}
		return strings.Join(ts, " | ")
	}
	if len(p.Type) == 0 {
		return "any"
	}
	var ts []string
	for _, t := range p.Type {
		ts = append(ts, toTypeScript(t))
	}
	return strings.Join(ts, " | ")
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		switch p := v.(type) {
		case toolProperty:
			return p.typeScriptType()
		case *toolProperty:
			if p != nil {
				return p.typeScriptType()
			}
		}
		return "any"
	},
}

// identifiers is template.Identifiers: field and variable names, without descending into chains.
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

// vars is Template.Vars: the lowercased, sorted, de-duplicated identifiers.
func vars(t *template.Template) []string {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			for _, id := range identifiers(n) {
				set[strings.ToLower(id)] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func parseTemplate(text string) (*template.Template, []string, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, nil, err
	}
	v := vars(t)
	if !contains(v, "messages") && !contains(v, "response") {
		// Ollama appends {{ .Response }} to templates that mention neither.
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, &parse.ActionNode{
			NodeType: parse.NodeAction,
			Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{
				NodeType: parse.NodeCommand,
				Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
			}}},
		})
	}
	return t, v, nil
}

// ---------------------------------------------------------------------------------------------------------
// inspect: thinking.InferTags, tools.parseTag, capabilities
// ---------------------------------------------------------------------------------------------------------

func visit(n parse.Node, enter func(parse.Node), exit func()) {
	if n == nil {
		return
	}
	enter(n)
	switch x := n.(type) {
	case *parse.ListNode:
		for _, c := range x.Nodes {
			visit(c, enter, exit)
		}
	case *parse.BranchNode:
		if x.Pipe != nil {
			visit(x.Pipe, enter, exit)
		}
		if x.List != nil {
			visit(x.List, enter, exit)
		}
		if x.ElseList != nil {
			visit(x.ElseList, enter, exit)
		}
	case *parse.ActionNode:
		visit(x.Pipe, enter, exit)
	case *parse.IfNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.RangeNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.WithNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.TemplateNode:
		visit(x.Pipe, enter, exit)
	case *parse.PipeNode:
		for _, c := range x.Cmds {
			visit(c, enter, exit)
		}
	case *parse.CommandNode:
		for _, a := range x.Args {
			visit(a, enter, exit)
		}
	}
	exit()
}

func pipeHasField(p *parse.PipeNode, field string) bool {
	found := false
	visit(p, func(n parse.Node) {
		if f, ok := n.(*parse.FieldNode); ok && f.Ident[0] == field {
			found = true
		}
	}, func() {})
	return found
}

// inferThinkingTags: for a .Thinking field inside a range over .Messages, the first and last text of the
// nearest enclosing list are the opening and closing tags.
func inferThinkingTags(t *template.Template) (string, string) {
	var ancestors []parse.Node
	open, close := "", ""
	visit(t.Root, func(n parse.Node) {
		ancestors = append(ancestors, n)
		f, ok := n.(*parse.FieldNode)
		if !ok || len(f.Ident) == 0 || f.Ident[0] != "Thinking" {
			return
		}
		var rng *parse.RangeNode
		for i := len(ancestors) - 1; i >= 0; i-- {
			if r, ok := ancestors[i].(*parse.RangeNode); ok {
				rng = r
				break
			}
		}
		if rng == nil || !pipeHasField(rng.Pipe, "Messages") {
			return
		}
		for i := len(ancestors) - 1; i >= 0; i-- {
			if l, ok := ancestors[i].(*parse.ListNode); ok {
				if tn, ok := l.Nodes[0].(*parse.TextNode); ok {
					open = strings.TrimSpace(string(tn.Text))
				}
				if tn, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
					close = strings.TrimSpace(string(tn.Text))
				}
				break
			}
		}
	}, func() { ancestors = ancestors[:len(ancestors)-1] })
	return open, close
}

func isToolCallsIf(n *parse.IfNode) bool {
	for _, c := range n.Pipe.Cmds {
		for _, a := range c.Args {
			if f, ok := a.(*parse.FieldNode); ok && contains(f.Ident, "ToolCalls") {
				return true
			}
		}
	}
	return false
}

// findToolCallsIf finds the first {{ if }} whose pipeline names a .ToolCalls field.
func findToolCallsIf(nodes []parse.Node) *parse.IfNode {
	for _, node := range nodes {
		var lists []*parse.ListNode
		switch n := node.(type) {
		case *parse.IfNode:
			if isToolCallsIf(n) {
				return n
			}
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ListNode:
			lists = []*parse.ListNode{n}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		}
		for _, l := range lists {
			if l != nil {
				if r := findToolCallsIf(l.Nodes); r != nil {
					return r
				}
			}
		}
	}
	return nil
}

// firstText is a depth-first search for the first text that stops at the first construct it enters.
func firstText(nodes []parse.Node) *parse.TextNode {
	for _, node := range nodes {
		var lists []*parse.ListNode
		stop := true
		switch n := node.(type) {
		case *parse.TextNode:
			return n
		case *parse.ActionNode:
			return nil
		case *parse.ListNode:
			lists, stop = []*parse.ListNode{n}, false
		case *parse.IfNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		default:
			continue
		}
		for _, l := range lists {
			if l != nil {
				if t := firstText(l.Nodes); t != nil {
					return t
				}
			}
		}
		if stop {
			return nil
		}
	}
	return nil
}

func toolCallTag(t *template.Template) string {
	tc := findToolCallsIf(t.Root.Nodes)
	if tc == nil {
		return ""
	}
	tn := firstText(tc.List.Nodes)
	if tn == nil {
		return ""
	}
	tag := strings.TrimSpace(string(tn.Text))
	tag = strings.ReplaceAll(tag, "\r\n", "\n")
	return strings.Split(tag, "{")[0]
}

type inspection struct {
	Vars           []string `json:"vars"`
	ThinkingOpen   string   `json:"thinking_open"`
	ThinkingClose  string   `json:"thinking_close"`
	Capabilities   []string `json:"capabilities"`
	ToolCallTag    string   `json:"tool_call_tag"`
	ToolParserTag  string   `json:"tool_parser_tag"`
	ToolRoundTrip  bool     `json:"tool_round_trip"`
	MessagesMode   bool     `json:"messages_mode"`
	ResponseAppend bool     `json:"response_appended"`
}

func inspect(text string) (inspection, error) {
	t, v, err := parseTemplate(text)
	if err != nil {
		return inspection{}, err
	}
	var res inspection
	res.Vars = v
	res.MessagesMode = contains(v, "messages")
	res.ResponseAppend = !contains(v, "messages") && !contains(v, "response")
	res.ThinkingOpen, res.ThinkingClose = inferThinkingTags(t)
	res.Capabilities = []string{}
	if contains(v, "tools") {
		res.Capabilities = append(res.Capabilities, "tools")
	}
	if contains(v, "suffix") {
		res.Capabilities = append(res.Capabilities, "insert")
	}
	if res.ThinkingOpen != "" && res.ThinkingClose != "" {
		res.Capabilities = append(res.Capabilities, "thinking")
	}
	res.ToolCallTag = toolCallTag(t)
	res.ToolParserTag = res.ToolCallTag
	if res.ToolParserTag == "" {
		res.ToolParserTag = "{" // tools.NewParser falls back to the first "{" of the output
	}
	res.ToolRoundTrip = contains(v, "tools") && contains(v, "toolcalls") &&
		(strings.Contains(text, `eq .Role "tool"`) || strings.Contains(text, "tool_response") || strings.Contains(text, "TOOL_RESULTS"))
	return res, nil
}

// ---------------------------------------------------------------------------------------------------------
// render
// ---------------------------------------------------------------------------------------------------------

func render(in input) (string, error) {
	t, v, err := parseTemplate(in.Template)
	if err != nil {
		return "", fmt.Errorf("template error: %w", err)
	}
	if !contains(v, "messages") {
		return "", errors.New("legacy templates (without .Messages) are not supported by this harness")
	}
	family := "qwen3"
	if in.Family != nil {
		family = *in.Family
	}
	d := in.Data
	system, msgs := collate(prepareMessages(d, family))
	thinkLevel := ""
	if d.IsThinkSet && d.Think {
		thinkLevel = "medium" // api.ThinkValue.String() of a plain true
	}
	if d.ThinkLevel != nil {
		thinkLevel = *d.ThinkLevel
	}
	var b bytes.Buffer
	err = t.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   convertMessages(msgs),
		"Tools":      convertTools(d.Tools),
		"Response":   "",
		"Think":      d.Think,
		"ThinkLevel": thinkLevel,
		"IsThinkSet": d.IsThinkSet,
	})
	if err != nil {
		return "", err
	}
	return b.String(), nil
}

func run(stdin io.Reader, stdout io.Writer) error {
	raw, err := io.ReadAll(stdin)
	if err != nil {
		return err
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		return fmt.Errorf("bad input JSON: %w", err)
	}
	switch in.Mode {
	case "", "render":
		out, err := render(in)
		if err != nil {
			return err
		}
		_, err = io.WriteString(stdout, out)
		return err
	case "inspect":
		res, err := inspect(in.Template)
		if err != nil {
			return fmt.Errorf("template error: %w", err)
		}
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(res)
	default:
		return fmt.Errorf("unknown mode %q (want render or inspect)", in.Mode)
	}
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "ollama_template:", err)
		os.Exit(1)
	}
}
