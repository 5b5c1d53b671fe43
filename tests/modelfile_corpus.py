"""The Modelfiles of the differential test (tests/test_modelfile_differential.py), made on the fly.

Three groups, each a dict of file name -> bytes:

* ``ours``: what so8t_export.modelfile.render_modelfile writes, with various options;
* ``hand_written``: edge cases of the grammar, one per rule or oddity;
* ``mutations``: seed Modelfiles put through systematic rewrites (encodings, line ends, case, blanks,
  quotes, comments, truncation, line deletion) and seeded random character edits.

The verdict of Ollama's harness must not depend on the file system, and ollama_template resolves relative
paths against a folder that does not exist. So FROM values here are model names or relative/absolute paths
to nothing, ADAPTER/DRAFT paths are relative (they fail as missing files, which the test predicts), and the
random edits draw from an alphabet without '/', '~' and '.', so they cannot make a path to something that
exists. Floats may spell inf or NaN: both sides must then refuse the request that Go's encoding/json
cannot marshal.
"""

from __future__ import annotations

import random
import re

from so8t_export.modelfile import DEPRECATED_PARAMETERS, PARAMETER_TYPES, render_modelfile

Corpus = dict[str, bytes]


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------- ours


def ours() -> Corpus:
    """render_modelfile's output for a spread of options (the GGUF it names does not exist)."""
    systems = {
        "none": None,
        "plain": "You are SO8T.",
        "multiline": 'You are SO8T.\nAnswer "briefly".\n  日本語も可。 👋\n',
        "quotes-at-ends": '"quoted" and ends with a quote"',
        "padded": "   padded   ",
        "empty": "",
        "tab": "tab\there",
        "crlf": "line one\r\nline two\r\n",
        "hash": "# not a comment\n#nor this",
        "keywords": "FROM elsewhere\nPARAMETER top_k 1\nMESSAGE user hi",
        "unicode15": "shaking face \U0001fae8, Kawi \U00011f04, CJK Ext H \U00031350",
        "single-quotes": "it's 'fine'",
        "long": "x" * 5000,
    }
    params = {
        "defaults": [],
        "temperature": [("temperature", "0.7")],
        "stops": [("stop", "</s>"), ("stop", " User:"), ("stop", "\n\n")],
        "min_p-seed": [("min_p", "0.05"), ("seed", "-1")],
        "runner": [("num_gpu", "99"), ("main_gpu", "0"), ("use_mmap", "false"), ("num_thread", "8")],
        "floats": [("top_p", "1"), ("typical_p", ".5"), ("presence_penalty", "1.5e-1"),
                   ("repeat_penalty", "1.1")],
        "ints": [("top_k", "+40"), ("num_predict", "-2"), ("repeat_last_n", "0064"),
                 ("num_keep", "9223372036854775807")],
        "stop-quoted": [("stop", '"'), ("stop", "<|im_end|> "), ("stop", '"x'), ("stop", "a # b")],
    }
    paths = [
        ("so8t-qwen3-4b-q8_0.gguf", "so8t-qwen3-4b.Modelfile"),
        ("weights/m.gguf", "Modelfile"),
        ("m.gguf", "sub/Modelfile"),
        ("my models/ odd name.gguf", "Modelfile"),
        ("/nonexistent/abs/model.gguf", "Modelfile"),
    ]
    base = "/nonexistent-so8t-corpus"

    def render(gguf: str = f"{base}/m.gguf", modelfile: str = f"{base}/Modelfile", **options) -> bytes:
        return _b(render_modelfile(gguf, modelfile, **options))

    out: Corpus = {}
    for sname, system in systems.items():
        out[f"ours-system-{sname}"] = render(system=system)
    for pname, overrides in params.items():
        out[f"ours-params-{pname}"] = render(num_ctx=4096, parameters=overrides)
    for i, (gguf, modelfile) in enumerate(paths):
        gguf = gguf if gguf.startswith("/") else f"{base}/{gguf}"
        out[f"ours-path-{i}"] = render(gguf, f"{base}/{modelfile}")
    for num_ctx in (1, 2048, 262144):
        out[f"ours-num-ctx-{num_ctx}"] = render(num_ctx=num_ctx)
    return out


# ------------------------------------------------------------------------------------------- hand-written

_F = "FROM foo\n"
_U16 = b"\xff\xfe" + "FROM a".encode("utf-16-le")  # UTF-16LE with a BOM, for the surrogate cases

HAND_WRITTEN: dict[str, str | bytes] = {
    # FROM: anywhere, any number, any case; the value is the rest of the line
    "from-only": "FROM foo\n",
    "from-no-newline": "FROM foo",
    "from-lower": "from foo\n",
    "from-mixed-case": "FrOm foo\nfROM bar\n",
    "from-twice": "FROM foo\nFROM bar\n",
    "from-last": "PARAMETER top_k 1\nSYSTEM hi\nFROM foo\n",
    "from-inner-spaces": "FROM     SOME  NAME    \n",
    "from-path-with-space": "FROM /models/my model.gguf \n",
    "from-tag": "FROM qwen3:4b-thinking-2507-q8_0\n",
    "from-hash-in-value": "FROM foo # not a comment\n",
    "from-quoted-spaces": 'FROM "   spaced name  "\n',
    "from-empty-value": "FROM \n",
    "from-empty-value-eof": "FROM ",
    "from-blank-value": "FROM  \t \nSYSTEM x\n",
    "from-empty-quotes": 'FROM ""\n',
    "from-tab-separator": "FROM\tfoo\n",
    "from-missing-relative-gguf": "FROM ./so8t-qwen3-4b-q8_0.gguf\n",
    "from-missing-parent-gguf": "FROM ../weights/m.gguf\n",
    # no FROM
    "empty": "",
    "blank-lines": "\n\n \t\n",
    "comment-only": "# only a comment\n",
    "commented-from": "#FROM foo\n",
    "system-only": "SYSTEM hi\n",
    "parameter-only": "PARAMETER top_k 1",
    # comments
    "comment-before": "\n# comment\nFROM foo\n\t",
    "comment-indented": "  # indented\n\t# tab\nFROM foo\n",
    "comment-at-eof-no-newline": "FROM foo\n# last",
    "comment-crlf": "FROM foo\r\n# c\r\nSYSTEM x\r\n",
    "comment-empty-lines": "FROM foo\n#\n#\n",
    "comment-after-value": "FROM foo\nSYSTEM hi # kept\n",
    "comment-inside-quotes": 'FROM foo\nSYSTEM """a\n# kept\nb"""\n',
    # command words
    "unknown-command": "FOO bar\nFROM x\n",
    "unknown-command-after-from": _F + "NOPE some value\n",
    "digit-in-command": _F + "FR0M bar\n",
    "command-plural": _F + "PARAMETERS x 1\n",
    "command-indented": _F + "  PARAMETER top_k 1\n\tSYSTEM x\n",
    "command-digit-first": _F + "1FROM x\n",
    "command-underscore-first": _F + "_PARAMETER x 1\n",
    "command-quote-first": _F + '"SYSTEM" x\n',
    "command-nul-first": "\x00FROM foo\n",
    "command-zwsp-first": "\u200bFROM foo\n",
    "command-bom-first-inside": _F + "\ufeffSYSTEM hi\n",
    "command-nbsp-first": "\u00a0FROM foo\n",
    "command-formfeed-first": "\fFROM foo\n",
    "command-vtab-first": _F + "\vSYSTEM x\n",
    "command-nel-first": _F + "\x85SYSTEM x\n",
    "command-ideographic-space-first": "\u3000FROM foo\n",
    "command-nul-inside": _F + "SYS\x00TEM hi\n",
    "command-then-newline": _F + "SYSTEM\n",
    "command-then-eof": _F + "SYSTEM",
    "command-then-colon": _F + "SYSTEM:hi\n",
    "command-then-crlf": _F.replace("\n", "\r\n") + "SYSTEM\r\n",
    "command-non-ascii-first": _F + "ÜBER x\n",
    "command-non-ascii-inside": _F + "FROMÜ x\n",
    "command-brace": _F + "TEMPLATE{{ .Prompt }}\n",
    "command-nbsp-separator": "FROM\u00a0foo\n",
    "command-unknown-at-eof": _F + "WHATEVER",
    "command-replacement-char-first": _F + "\ufffdSYSTEM x\n",
    "all-commands": (
        "FROM foo\nLICENSE MIT\nTEMPLATE {{ .Prompt }}\nSYSTEM hi\nRENDERER qwen3-coder\n"
        "PARSER qwen3-thinking\nPARAMETER top_k 1\nMESSAGE user hi\nREQUIRES 0.14.0\n"
    ),
    "all-commands-lower": (
        "from foo\nlicense mit\ntemplate t\nsystem s\nrenderer r\nparser p\nparameter top_k 1\n"
        "message user hi\nrequires 0.14.0\n"
    ),
    "adapter": _F + "ADAPTER ./lora.gguf\n",
    "adapter-lower": _F + "adapter lora.gguf\n",
    "draft": _F + "DRAFT ./draft.gguf\n",
    "adapter-after-bad-parameter": _F + "PARAMETER top_k x\nADAPTER ./lora.gguf\n",
    "adapter-before-bad-parameter": _F + "ADAPTER ./lora.gguf\nPARAMETER top_k x\n",
    "license-twice": _F + "LICENSE one\nLICENSE two\n",
    "license-multiline": _F + 'LICENSE """MIT\n\nCopyright"""\n',
    "template-twice": _F + "TEMPLATE a\nTEMPLATE b\nSYSTEM c\nSYSTEM d\n",
    "renderer-parser": _F + "RENDERER qwen3-coder\nPARSER qwen3\n",
    # REQUIRES
    "requires-plain": _F + "REQUIRES 0.14.0\n",
    "requires-v": _F + "REQUIRES v0.14.0\n",
    "requires-major": _F + "REQUIRES 1\n",
    "requires-minor": _F + "REQUIRES 1.2\n",
    "requires-pre-build": _F + "REQUIRES 1.2.3-rc.1+build.5\n",
    "requires-leading-zero": _F + "REQUIRES 01.2.3\n",
    "requires-word": _F + "REQUIRES latest\n",
    "requires-four-parts": _F + "REQUIRES 1.2.3.4\n",
    "requires-empty": _F + 'REQUIRES ""\n',
    "requires-vv": _F + "REQUIRES vv1\n",
    "requires-short-pre": _F + "REQUIRES 1.2-pre\n",
    "requires-numeric-pre-zero": _F + "REQUIRES 1.2.3-01\n",
    "requires-upper-v": _F + "REQUIRES V1.2.3\n",
    # PARAMETER: names and heads
    "parameter-double-space": _F + "PARAMETER  top_k 1\n",
    "parameter-tab-after-name": _F + "PARAMETER top_k\t1\n",
    "parameter-tab-after-keyword": _F + "PARAMETER\ttop_k 1\n",
    "parameter-name-eof": _F + "PARAMETER top_k",
    "parameter-name-newline": "\nFROM foo\nPARAMETER top_k\n",
    "parameter-keyword-newline": _F + "PARAMETER\n",
    "parameter-keyword-eof": _F + "PARAMETER",
    "parameter-keyword-space-eof": _F + "PARAMETER ",
    "parameter-keyword-space-newline": _F + "PARAMETER \n",
    "parameter-dash": _F + "PARAMETER top-k 1\n",
    "parameter-dot": _F + "PARAMETER top.k 1\n",
    "parameter-non-ascii": _F + "PARAMETER tøp 1\n",
    "parameter-digits-first": _F + "PARAMETER 1top 1\n",
    "parameter-empty-value": _F + "PARAMETER top_k  \n",
    "parameter-empty-value-eof": _F + "PARAMETER stop ",
    "parameter-stop-empty": _F + "PARAMETER stop \n",
    "parameter-stop-empty-quotes": _F + 'PARAMETER stop ""\n',
    "parameter-case": _F + "PARAMETER Temperature 0.6\n",
    "parameter-upper": _F + "PARAMETER TOP_K 1\n",
    "parameter-unknown": _F + "PARAMETER warp_factor 9\n",
    "parameter-numa": _F + "PARAMETER numa true\n",
    "parameter-num-gqa": _F + "PARAMETER num_gqa 1\n",
    "parameter-tfs-z": _F + "PARAMETER tfs_z 1\n",
    "parameter-deprecated-bad-value": _F + "PARAMETER use_mlock banana\n",
    "parameter-all-deprecated": _F + "".join(f"PARAMETER {n} 1\n" for n in DEPRECATED_PARAMETERS),
    # PARAMETER named like a command: Ollama's request builder reads it as that command
    "parameter-named-template": _F + "PARAMETER template {{ .Prompt }}\n",
    "parameter-named-system": _F + "PARAMETER system be brief\n",
    "parameter-named-model": "PARAMETER model foo\n",
    "parameter-named-message": _F + "PARAMETER message hi: there\n",
    "parameter-named-message-no-colon": _F + "PARAMETER message hello\n",
    "parameter-named-license": _F + "PARAMETER license MIT\n",
    "parameter-named-requires": _F + "PARAMETER requires 1.0\n",
    "parameter-named-requires-bad": _F + "PARAMETER requires banana\n",
    "parameter-named-renderer": _F + "PARAMETER renderer r\nPARAMETER parser p\n",
    "parameter-named-adapter": _F + "PARAMETER adapter lora.gguf\n",
    "parameter-named-draft": _F + "PARAMETER draft d.gguf\n",
    "parameter-named-from": _F + "PARAMETER from foo\n",
    # PARAMETER values: int
    "int-plus": _F + "PARAMETER num_ctx +5\n",
    "int-minus": _F + "PARAMETER seed -1\n",
    "int-leading-zeros": _F + "PARAMETER top_k 007\n",
    "int-underscore": _F + "PARAMETER num_ctx 1_000\n",
    "int-float": _F + "PARAMETER num_ctx 1.0\n",
    "int-max": _F + "PARAMETER seed 9223372036854775807\n",
    "int-min": _F + "PARAMETER seed -9223372036854775808\n",
    "int-overflow": _F + "PARAMETER seed 9223372036854775808\n",
    "int-huge": _F + "PARAMETER num_ctx 99999999999999999999\n",
    "int-long-zeros": _F + "PARAMETER num_ctx 0000000000000000000000000000004096\n",
    "int-hex": _F + "PARAMETER num_ctx 0x10\n",
    "int-arabic-digit": _F + "PARAMETER top_k \u0663\n",
    "int-quoted": _F + 'PARAMETER top_k "20"\n',
    "int-spaced": _F + "PARAMETER top_k  20  \n",
    "int-inner-space": _F + "PARAMETER top_k 2 0\n",
    "int-empty-quotes": _F + 'PARAMETER top_k ""\n',
    "int-main-gpu": _F + "PARAMETER main_gpu -1\n",
    "int-all": _F + "".join(f"PARAMETER {n} 3\n" for n, k in PARAMETER_TYPES.items() if k == "int"),
    # float
    "float-all": _F + "".join(f"PARAMETER {n} 0.25\n" for n, k in PARAMETER_TYPES.items() if k == "float"),
    "float-int": _F + "PARAMETER temperature 1\n",
    "float-dot-first": _F + "PARAMETER temperature .5\n",
    "float-dot-last": _F + "PARAMETER temperature 5.\n",
    "float-dot-only": _F + "PARAMETER temperature .\n",
    "float-exp": _F + "PARAMETER temperature 6E-1\n",
    "float-exp-plus": _F + "PARAMETER temperature 0.06e+1\n",
    "float-exp-missing": _F + "PARAMETER temperature 1e\n",
    "float-exp-only": _F + "PARAMETER temperature e5\n",
    "float-underflow": _F + "PARAMETER temperature 1e-50\n",
    "float-subnormal": _F + "PARAMETER min_p 1e-40\n",
    "float-smallest-subnormal-half": _F + "PARAMETER min_p 7.00649232162408535461864791644958065640130970938"
    "2578858785341279723e-46\n",
    "float-max": _F + "PARAMETER temperature 3.4028235e38\n",
    "float-overflow": _F + "PARAMETER temperature 3.5e38\n",
    "float-overflow-huge": _F + "PARAMETER temperature 1e999\n",
    "float-huge-exponent-zero": _F + "PARAMETER temperature 0e99999999999\n",
    "float-underscore": _F + "PARAMETER temperature 1_0.5\n",
    "float-underscore-bad": _F + "PARAMETER temperature 1__0\n",
    "float-underscore-lead": _F + "PARAMETER temperature _1\n",
    "float-underscore-exp": _F + "PARAMETER temperature 1e1_0\n",
    "float-hex": _F + "PARAMETER temperature 0x1p-2\n",
    "float-hex-frac": _F + "PARAMETER temperature 0x1.8p1\n",
    "float-hex-underscore": _F + "PARAMETER temperature 0x_1p0\n",
    "float-hex-no-p": _F + "PARAMETER temperature 0x10\n",
    "float-hex-long": _F + "PARAMETER temperature 0x1.000001fffffffffffffffp0\n",
    "float-suffix": _F + "PARAMETER temperature 1.0f\n",
    "float-word": _F + "PARAMETER temperature hot\n",
    "float-comma": _F + "PARAMETER temperature 0,6\n",
    "float-plus": _F + "PARAMETER temperature +0.6\n",
    "float-minus-zero": _F + "PARAMETER temperature -0\n",
    "float-nan-signed": _F + "PARAMETER temperature +nan\n",
    "float-infin": _F + "PARAMETER temperature infin\n",
    # parsed, then refused when the client encodes the request as JSON
    "float-inf": _F + "PARAMETER temperature inf\n",
    "float-minus-infinity": _F + "PARAMETER temperature -Infinity\n",
    "float-nan": _F + "PARAMETER top_p NaN\n",
    "float-overflow-to-inf": _F + "PARAMETER temperature 1e39\n",
    "float-two-nonfinite": _F + "PARAMETER top_p nan\nPARAMETER temperature inf\n",
    "float-inf-replaced": _F + "PARAMETER temperature inf\nPARAMETER temperature 0.6\n",
    "float-inf-then-bad-int": _F + "PARAMETER temperature inf\nPARAMETER num_ctx lots\n",
    "float-double-rounding": _F + "PARAMETER temperature 1.0000000596046447753906250001\n",
    "float-tie-even": _F + "PARAMETER temperature 1.000000059604644775390625\n",
    "float-long-digits": _F + "PARAMETER top_p 0." + "3" * 400 + "\n",
    "float-point-one": _F + "PARAMETER top_p 0.1\n",
    "float-quoted": _F + 'PARAMETER temperature "0.6"\n',
    "float-padded-quoted": _F + 'PARAMETER temperature " 0.6"\n',
    # bool
    "bool-true": _F + "PARAMETER use_mmap true\n",
    "bool-forms": _F + "".join(
        f"PARAMETER use_mmap {v}\n" for v in ("1", "t", "T", "TRUE", "True", "0", "f", "F", "FALSE", "False")
    ),
    "bool-yes": _F + "PARAMETER use_mmap yes\n",
    "bool-mixed-case": _F + "PARAMETER use_mmap tRue\n",
    "bool-empty": _F + "PARAMETER use_mmap \n",
    # string list
    "stop-many": _F + "PARAMETER stop a\nPARAMETER temperature 0.1\nPARAMETER stop b\nPARAMETER top_p 0.2",
    "stop-user": _F + "PARAMETER stop Human: \n",
    "stop-quoted-space": _F + 'PARAMETER stop "Human: "\n',
    "stop-triple-newline": _F + 'PARAMETER stop """Human:\n"""\n',
    "stop-specials": _F + "PARAMETER stop <|im_end|>\nPARAMETER stop </s>\nPARAMETER stop <|endoftext|>\n",
    "stop-hash": _F + "PARAMETER stop #\n",
    "stop-then-other-repeat": _F + "PARAMETER top_k 1\nPARAMETER top_k 2\nPARAMETER stop x\n",
    # MESSAGE
    "message-roles": _F + "MESSAGE system sys\nMESSAGE user hi\nMESSAGE assistant hello\n",
    "message-no-newline": _F + "MESSAGE system Answer in one line.",
    "message-role-case": _F + "MESSAGE System hi\n",
    "message-role-upper": _F + "MESSAGE USER hi\n",
    "message-role-tool": _F + "MESSAGE tool result\n",
    "message-role-empty": _F + "MESSAGE  user hi\n",
    "message-role-digit": _F + "MESSAGE user1 hi\n",
    "message-role-colon": _F + "MESSAGE user: hi\n",
    "message-role-newline": _F + "MESSAGE user\n",
    "message-role-eof": _F + "MESSAGE user",
    "message-empty-content": _F + "MESSAGE user \n",
    "message-multiline": _F + 'MESSAGE system """\nTwo\nlines\n"""\n\t\t\t',
    "message-colon-content": _F + "MESSAGE assistant a: b: c\n",
    "message-tab": _F + "MESSAGE\tuser\thi\n",
    "message-keyword-eof": _F + "MESSAGE",
    "message-keyword-newline": _F + "MESSAGE\n",
    "message-keyword-space-eof": _F + "MESSAGE ",
    # quotes
    "quote-empty": _F + 'SYSTEM ""\n',
    "quote-triple-empty": _F + 'SYSTEM """"""\n',
    "quote-single-inside": _F + "SYSTEM \"'\"\n",
    "quote-four": _F + 'SYSTEM """"\n"""\n',
    "quote-five": _F + 'SYSTEM """""\n',
    "quote-seven": _F + 'SYSTEM """""""\n',
    "quote-lone": _F + 'SYSTEM "\n',
    "quote-lone-then-closed": _F + 'SYSTEM "\n"\n',
    "quote-two-then-one": _F + 'SYSTEM ""\n"\n',
    "quote-text-after-close": _F + 'SYSTEM "a" b\nFROM x"\n',
    "quote-text-after-close-eof": _F + 'SYSTEM "a" b',
    "quote-closed-then-blanks": _F + 'SYSTEM "a"   \t\n',
    "quote-triple-mid-line": _F + 'SYSTEM """say """hi""" now"""\n',
    "quote-triple-ends-line-early": _F + 'SYSTEM """Say\n"""hi"""\nPARAMETER top_k 1\n"""\n',
    "quote-triple-multiline": _F + 'SYSTEM """\nFirst line\nsecond line.\n"""\n\t\t\t',
    "quote-triple-close-on-text": _F + 'SYSTEM """First line\nsecond line."""\n',
    "quote-triple-inner-quotes": _F + 'SYSTEM """\nSay "yes" or "no".\n"""\n',
    "quote-mixed-singles": _F + 'SYSTEM """\'"\'\'""\'"\'""\'\'"\'"""\n',
    "quote-unterminated-triple": _F + 'SYSTEM """Never closed.""\n\t\t\t',
    "quote-unterminated-double": _F + 'SYSTEM "\n\t\t\t',
    "quote-unterminated-eof": _F + 'TEMPLATE """{{ .Prompt }}',
    "quote-template-eof-closed": '\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""',
    "quote-padded-inside": _F + 'LICENSE "Apache-2.0   "\nTEMPLATE """   {{ .Prompt }}   """    \n',
    "quote-after-blanks": _F + 'SYSTEM \t  "x"\n',
    "quote-not-at-start": _F + 'SYSTEM a "b" c\n',
    "quote-single-quotes": _F + "SYSTEM 'x'\n",
    "quote-cr-inside": _F + 'SYSTEM """a\rb\r\nc"""\n',
    "quote-blank-first-line": _F + 'SYSTEM   \n"x"\n',
    "quote-closing-with-trailing-tab": _F + 'SYSTEM """a\nb"""\t\t\nSYSTEM c\n',
    "quote-double-multiline": _F + 'SYSTEM "line one\nline two"\n',
    "quote-double-closing-early": _F + 'SYSTEM "a\nb" c"\n',
    "quote-triple-crlf": _F.replace("\n", "\r\n") + 'SYSTEM """a\r\nb"""\r\n',
    # line ends and blanks
    "crlf": "FROM foo\r\nPARAMETER top_k 1\r\nSYSTEM hi\r\n",
    "cr-only": "FROM foo\rPARAMETER top_k 1\rSYSTEM hi\r",
    "crlf-bad-command": "FROM foo\r\nBAD x\r\n",
    "cr-in-bare-value": "FROM foo\nSYSTEM a\rb\n",
    "trailing-tabs": "FROM foo\nSYSTEM hi\n\t\t\t",
    "tab-in-value": "FROM foo\nSYSTEM a\tb\n",
    "nul-in-value": "FROM foo\nPARAMETER top_k 2\x000\n",
    "controls-in-value": "FROM foo\nSYSTEM a\x07b\x1bc\x7fd\n",
    "nbsp-in-value": "FROM foo\nSYSTEM a\u00a0b\u2028c\u2029d\n",
    "zwsp-in-value": "FROM foo\nSYSTEM a\u200bb\u200dc\ufeffd\n",
    # Unicode
    "unicode-multibyte": "FROM base\n\tSYSTEM 日本語 👋",
    "unicode-15": "FROM foo\nSYSTEM \U0001fae8 \U00011f00 \U00031350 \u0cf3\n",
    "unicode-16": "FROM foo\nSYSTEM \U0001fae9 \U0001fc00\n",
    "unicode-unassigned": "FROM foo\nSYSTEM a\u0378b\n",
    "unicode-private-use": "FROM foo\nSYSTEM a\ue000b\U000f0000c\n",
    "unicode-combining": "FROM foo\nSYSTEM e\u0301 a\u0308\n",
    "unicode-zwj-emoji": "FROM foo\nSYSTEM \U0001f468\u200d\U0001f469\u200d\U0001f467\n",
    "unicode-replacement": "FROM foo\nSYSTEM \ufffd\n",
    "unicode-noncharacter": "FROM foo\nSYSTEM a\uffffb\n",
    # encodings
    "bom-utf8": b"\xef\xbb\xbfFROM foo\nSYSTEM hi\n",
    "bom-utf16le": b"\xff\xfe" + "FROM base\nPARAMETER top_k 1\nSYSTEM In UTF-16.\n".encode("utf-16-le"),
    "bom-utf16be": b"\xfe\xff" + "FROM base\nPARAMETER top_k 4096\nSYSTEM 日本語 👋\n".encode("utf-16-be"),
    "utf16le-no-bom": "FROM foo\n".encode("utf-16-le"),
    "bom-utf32le": b"\xff\xfe\x00\x00" + "FROM foo\n".encode("utf-32-le"),
    "bom-utf32be": b"\x00\x00\xfe\xff" + "FROM foo\n".encode("utf-32-be"),
    "bom-only-utf8": b"\xef\xbb\xbf",
    "bom-only-utf16le": b"\xff\xfe",
    "bom-only-utf16be": b"\xfe\xff",
    "bom-twice": b"\xef\xbb\xbf\xef\xbb\xbfFROM foo\n",
    "bom-then-garbage": b"\xef\xbb\xbf!!!\n",
    "bom-partial": b"\xef\xbbFROM foo\n",
    "utf8-truncated-in-value": b"FROM a\xe2\x82b\n",
    "utf8-truncated-in-value-bom": b"\xef\xbb\xbfFROM a\xe2\x82b\n",
    "utf8-surrogate": b"FROM a\xed\xa0\x80b\n",
    "utf8-surrogate-bom": b"\xef\xbb\xbfFROM a\xed\xa0\x80b\n",
    "utf8-overlong": b"FROM a\xc0\x80b\xe0\x80\x80c\n",
    "utf8-overlong-bom": b"\xef\xbb\xbfFROM a\xc0\x80b\xe0\x80\x80c\n",
    "utf8-too-big": b"FROM a\xf4\x90\x80\x80b\n",
    "utf8-too-big-bom": b"\xef\xbb\xbfFROM a\xf4\x90\x80\x80b\n",
    "utf8-lone-continuations": b"FROM a\x80\xbf\x80b\n",
    "utf8-truncated-at-eof": b"FROM a\xf0\x9f\x98",
    "utf8-truncated-at-eof-bom": b"\xef\xbb\xbfFROM a\xf0\x9f\x98",
    "utf8-invalid-command": b"FROM ./model.gguf\n\xff\xfe PARAMETER top_k 20\n",
    "utf8-latin1": b"FROM caf\xe9\n",
    "utf16-lone-high": _U16 + b"\x00\xd8" + "b\n".encode("utf-16-le"),
    "utf16-lone-low": _U16 + b"\x00\xdc" + "b\n".encode("utf-16-le"),
    "utf16-low-low": _U16 + b"\x00\xdc\x00\xdc" + "b\n".encode("utf-16-le"),
    "utf16-high-high-low": _U16 + b"\x00\xd8\x00\xd8\x00\xdc" + "b\n".encode("utf-16-le"),
    "utf16-odd-byte": _U16 + b"x",
    "utf16-high-at-eof": _U16 + b"\x00\xd8",
    "utf16-high-and-odd-byte": _U16 + b"\x00\xd8x",
    "utf16be-crlf": b"\xfe\xff" + "FROM foo\r\nSYSTEM x\r\n".encode("utf-16-be"),
}


def hand_written() -> Corpus:
    return {f"hand-{name}": _b(data) for name, data in HAND_WRITTEN.items()}


# ------------------------------------------------------------------------------------------- mutations

KITCHEN_SINK = (
    "# a Modelfile with one of everything\n"
    "FROM so8t-missing\n"
    'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"""\n'
    'SYSTEM "You are \'SO8T\'.\n  Be brief."\n'
    "PARAMETER temperature 0.6\n"
    "PARAMETER top_k 20\n"
    "PARAMETER use_mmap true\n"
    "PARAMETER stop <|im_end|>\n"
    'PARAMETER stop "<|im_start|> "\n'
    "MESSAGE user Hello there!\n"
    "MESSAGE assistant Hi: how are you?\n"
    "LICENSE Apache-2.0\n"
    "REQUIRES 0.14.0\n"
)
MINIMAL = "FROM foo\nSYSTEM hi\nPARAMETER num_ctx 4096\n"


def _keywords(text: str, change) -> str:
    lines = []
    for line in text.split("\n"):
        stripped = line.lstrip(" \t")
        word, sep, rest = stripped.partition(" ")
        if sep and word.isalpha():
            line = line[: len(line) - len(stripped)] + change(word) + sep + rest
        lines.append(line)
    return "\n".join(lines)


REWRITES = {
    "utf8-bom": lambda t: b"\xef\xbb\xbf" + _b(t),
    "utf16le-bom": lambda t: b"\xff\xfe" + t.encode("utf-16-le"),
    "utf16be-bom": lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
    "utf16le-no-bom": lambda t: t.encode("utf-16-le"),
    "crlf": lambda t: t.replace("\n", "\r\n"),
    "cr": lambda t: t.replace("\n", "\r"),
    "lf-cr": lambda t: t.replace("\n", "\n\r"),
    "no-final-newline": lambda t: t.rstrip("\n"),
    "extra-blank-lines": lambda t: t.replace("\n", "\n\n \t\n"),
    "trailing-blanks": lambda t: t.replace("\n", " \t\n"),
    "indent-spaces": lambda t: "\n".join("   " + line for line in t.split("\n")),
    "indent-tabs": lambda t: "\n".join("\t" + line for line in t.split("\n")),
    "keywords-lower": lambda t: _keywords(t, str.lower),
    "keywords-title": lambda t: _keywords(t, str.title),
    "keywords-swapcase": lambda t: _keywords(t, str.swapcase),
    "keywords-with-digit": lambda t: _keywords(t, lambda w: w + "2"),
    "tab-separators": lambda t: _keywords(t, lambda w: w).replace(" ", "\t"),
    "double-space-separators": lambda t: t.replace(" ", "  "),
    "no-separator-spaces": lambda t: t.replace(" ", ""),
    "comments-between": lambda t: t.replace("\n", "\n# comment\n"),
    "comments-trailing": lambda t: t.replace("\n", " # trailing\n"),
    "comment-at-eof": lambda t: t + "# end",
    "triple-to-double-quotes": lambda t: t.replace('"""', '"'),
    "double-to-triple-quotes": lambda t: t.replace('"', '"""'),
    "quotes-removed": lambda t: t.replace('"', ""),
    "last-quote-removed": lambda t: t[: t.rfind('"')] + t[t.rfind('"') + 1 :] if '"' in t else t,
    "text-after-closing-quote": lambda t: t.replace('"\n', '" tail\n', 1),
    "nul-everywhere": lambda t: t.replace(" ", " \x00").replace("\n", "\x00\n"),
    "zwsp-before-lines": lambda t: t.replace("\n", "\n\u200b"),
    "bom-char-before-lines": lambda t: t.replace("\n", "\n\ufeff"),
    "nbsp-separators": lambda t: t.replace(" ", "\u00a0", 3),
    "roles-capitalised": lambda t: t.replace("MESSAGE user", "MESSAGE User").replace("assistant", "ASSISTANT"),
    "roles-tool": lambda t: t.replace("MESSAGE user", "MESSAGE tool"),
    "parameter-names-upper": lambda t: re.sub(r"(?m)^PARAMETER (\w+)", lambda m: m[0].upper(), t),
    "values-emptied": lambda t: re.sub(r"(?m)^([A-Za-z]+ ).*$", r"\1", t),
    "from-removed": lambda t: "\n".join(line for line in t.split("\n") if not line.startswith("FROM")),
    "from-doubled": lambda t: t + "FROM another\n",
    "unknown-command-appended": lambda t: t + "STOP here\n",
    "reversed-lines": lambda t: "\n".join(reversed(t.split("\n"))),
}

# Characters the random edits insert: the grammar's own, blanks, line ends and some unprintable ones; no '/',
# '~' or '.', so no edit makes a FROM/ADAPTER/DRAFT path to something that exists.
ALPHABET = [
    '"', '"""', "#", " ", "\t", "\n", "\r", "\r\n", ":", "_", "0", "1", "e", "x", "A", "M", "\x00", "\ufeff",
    "\u200b", "\u00a0", "é", "\ufffd", "FROM ", "PARAMETER ", "MESSAGE ", "SYSTEM ", "stop", "user ",
]  # fmt: skip


def _random_edit(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        action = rng.choice(("insert", "delete", "replace"))
        if action == "insert" or not text:
            text = text[:at] + rng.choice(ALPHABET) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + rng.randint(1, 4) :]
        else:
            text = text[:at] + rng.choice(ALPHABET) + text[at + 1 :]
    return text


def mutations(random_count: int = 150, seed: int = 20260914) -> Corpus:
    seeds = {"sink": KITCHEN_SINK, "min": MINIMAL}
    out: Corpus = {}
    for sname, text in seeds.items():
        for rname, rewrite in REWRITES.items():
            out[f"mut-{sname}-{rname}"] = _b(rewrite(text))
    # every prefix that ends at an interesting spot of the kitchen sink: EOF in every state
    cuts = sorted(
        {i for i, ch in enumerate(KITCHEN_SINK) if ch in ' \n"#:'}
        | {i + 1 for i, ch in enumerate(KITCHEN_SINK) if ch in ' \n"'}
    )
    for i in cuts[::3]:
        out[f"mut-sink-cut-{i:03d}"] = _b(KITCHEN_SINK[:i])
    lines = KITCHEN_SINK.split("\n")
    for i in range(len(lines)):
        out[f"mut-sink-without-line-{i:02d}"] = _b("\n".join(lines[:i] + lines[i + 1 :]))
    rng = random.Random(seed)
    for i in range(random_count):
        base = rng.choice((KITCHEN_SINK, MINIMAL))
        out[f"mut-random-{i:03d}"] = _b(_random_edit(base, rng))
    return out


def corpus() -> dict[str, Corpus]:
    """All three groups, by group name."""
    return {"ours": ours(), "hand-written": hand_written(), "mutations": mutations()}
