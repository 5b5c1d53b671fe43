package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestModelfileLines(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"good":       "FROM ./m.gguf\nPARAMETER temperature 0.6\nPARAMETER stop <|im_end|>\nPARAMETER stop \"<|im_start|>\"\nMESSAGE user \"\"\"hi\"\"\"\nPARAMETER mirostat 1\n",
		"bad_float":  "FROM m\nPARAMETER top_p high\n",
		"bad_cmd":    "FRUM m\n",
		"no_from":    "SYSTEM hi\n",
		"bad_semver": "FROM m\nREQUIRES next\n",
	}
	var paths []string
	for _, name := range []string{"good", "bad_float", "bad_cmd", "no_from", "bad_semver"} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(files[name]), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, path)
	}
	var out bytes.Buffer
	if err := runModelfile(paths, &out); err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for sc := bufio.NewScanner(&out); sc.Scan(); {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("%v: %s", err, sc.Text())
		}
		lines = append(lines, line)
	}
	if len(lines) != len(paths) {
		t.Fatalf("%d lines for %d files", len(lines), len(paths))
	}
	good := lines[0]
	if good["file"] != paths[0] || good["ok"] != true || good["error"] != nil {
		t.Errorf("good: %v", good)
	}
	cmds, _ := json.Marshal(good["commands"])
	want := `[["model","./m.gguf"],["temperature","0.6"],["stop","\u003c|im_end|\u003e"],["stop","\u003c|im_start|\u003e"],["message","user: hi"],["mirostat","1"]]`
	if string(cmds) != want {
		t.Errorf("good commands %s", cmds)
	}
	// The relative FROM names no file, so it stays as written; the deprecated mirostat is dropped.
	req, _ := json.Marshal(good["request"])
	want = `{"from":"./m.gguf","messages":[{"content":"hi","role":"user"}],"model":"","name":"",` +
		`"parameters":{"stop":["\u003c|im_end|\u003e","\u003c|im_start|\u003e"],"temperature":0.6}}`
	if string(req) != want {
		t.Errorf("good request %s", req)
	}
	for i, wantErr := range map[int]string{
		1: "invalid float value [high]",
		2: `(line 1): command must be one of "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"`,
		3: "no FROM line",
		4: "requires must be a valid semver (e.g. 0.14.0)",
	} {
		if l := lines[i]; l["ok"] != false || l["error"] != wantErr || l["request"] != nil || l["commands"] == nil {
			t.Errorf("%s: %v", filepath.Base(paths[i]), l)
		}
	}
}

func TestModelfileUnreadableFileFails(t *testing.T) {
	var out bytes.Buffer
	if err := runModelfile([]string{filepath.Join(t.TempDir(), "missing")}, &out); err == nil {
		t.Error("no error for a missing file")
	}
	var line map[string]any
	if err := json.Unmarshal(out.Bytes(), &line); err != nil || line["ok"] != false {
		t.Errorf("line %s (%v)", out.Bytes(), err)
	}
}
