package main

// `ollama_template modelfile FILE...`: Ollama's verdict on each Modelfile, one JSON line per file in argument
// order, for the differential test of our own Python validator:
//
//	{"file": "<path as given>", "ok": true|false, "error": "<text>", "commands": [["<name>", "<args>"], ...],
//	 "request": {<api.CreateRequest>}}
//
//   - ok: parser.ParseFile accepted the file and Modelfile.CreateRequest turned it into a create request
//     (that is where PARAMETER values are type-checked, by api.FormatParams, and REQUIRES is checked).
//   - error: only when not ok: the error text of ParseFile or, after it, CreateRequest or the request's JSON
//     encoding (inf and nan floats), as Ollama prints it.
//   - commands: ParseFile's commands, [Name, Args] as its Command holds them: the command lowercased
//     ("model" for FROM), or for PARAMETER the parameter's name as written; Args unquoted, a MESSAGE's as
//     "role: text". Empty when ParseFile failed.
//   - request: only when ok: the api.CreateRequest, marshalled by encoding/json with its own JSON tags.
//
// A file that cannot be read gets a line with ok false and the read error, and the exit status is 1.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/parser"
)

// noFilesDir is the directory CreateRequest resolves relative paths against. `ollama create -f F` passes
// F's own directory; this one does not exist, so the verdict does not depend on which files lie beside the
// Modelfile and no GGUF is ever hashed: a relative FROM resolves to a missing file, and CreateRequest then
// keeps it as written in request.from (what it does for a model name, or a GGUF that is missing); a relative
// ADAPTER or DRAFT fails with Ollama's error for a missing file. Absolute and ~ paths resolve as in Ollama.
const noFilesDir = "/nonexistent-so8t-modelfile-dir"

type verdict struct {
	File     string             `json:"file"`
	OK       bool               `json:"ok"`
	Error    string             `json:"error,omitempty"`
	Commands [][2]string        `json:"commands"`
	Request  *api.CreateRequest `json:"request,omitempty"`
}

func judge(data []byte) verdict {
	v := verdict{Commands: [][2]string{}}
	mf, err := parser.ParseFile(bytes.NewReader(data))
	if err != nil {
		v.Error = err.Error()
		return v
	}
	for _, c := range mf.Commands {
		v.Commands = append(v.Commands, [2]string{c.Name, c.Args})
	}
	// CreateRequest prints "warning: parameter X is deprecated" on stdout: send it to stderr, off our lines.
	stdout := os.Stdout
	os.Stdout = os.Stderr
	req, err := mf.CreateRequest(noFilesDir)
	os.Stdout = stdout
	if err != nil {
		v.Error = err.Error()
		return v
	}
	// `ollama create` then sends the request as JSON (api.Client.stream marshals it), and a float parameter
	// of inf or nan fails right there, before any server sees it: that error is the verdict too.
	if _, err := json.Marshal(req); err != nil {
		v.Error = err.Error()
		return v
	}
	v.OK, v.Request = true, req
	return v
}

func runModelfile(paths []string, w io.Writer) error {
	if _, err := os.Stat(noFilesDir); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s must not exist: relative paths in Modelfiles resolve against it", noFilesDir)
	}
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	unreadable := 0
	for _, path := range paths {
		var v verdict
		if data, err := os.ReadFile(path); err != nil {
			v = verdict{Error: err.Error(), Commands: [][2]string{}}
			unreadable++
		} else {
			v = judge(data)
		}
		v.File = path
		if err := enc.Encode(v); err != nil {
			return err
		}
	}
	if unreadable > 0 {
		return fmt.Errorf("%d of %d files could not be read", unreadable, len(paths))
	}
	return nil
}
