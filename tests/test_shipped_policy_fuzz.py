"""The shell allowlist (rego/tools/shell.rego) under generated commands.

Two properties, each checked against the embedded engine and real OPA
(opa-golib-python-bindings) together:

- a command holding anything outside the plain alphabet (a shell
  metacharacter, a quote, a backslash, a newline, a control or non-ASCII
  character) or an empty word is refused, with the reason that says so;
- a command the policy allows means exactly its words: ``shlex.split`` and a
  real POSIX shell (dash and bash) give the same argv as ``cmd.split(" ")``, its
  first words name a listed command, and no word climbs out of the workspace.

Derandomised as tests/fuzz/ is (the same examples each run); REGATE_FUZZ_EXAMPLES
raises the count and randomises.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opa_bindings import OpaEngine

from proxy.engines.bundle import load_bundle
from proxy.engines.decision import parse_decision
from proxy.engines.embedded import EmbeddedEngine

ROOT = Path(__file__).resolve().parents[1]
FUZZING = bool(os.environ.get("REGATE_FUZZ_EXAMPLES"))
EXAMPLES = int(os.environ.get("REGATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZING,
                suppress_health_check=list(HealthCheck))

ALPHABET = "ABCXYZabcxyz0189_./=:,@%+-"
PLAIN = re.compile(r"[A-Za-z0-9_./=:,@%+-]+( [A-Za-z0-9_./=:,@%+-]+)*")
COMMANDS = yaml.safe_load((ROOT / "policies" / "tools" / "data.yaml").read_text())["shell"]["commands"]
SHELLS = [s for s in ("/bin/dash", "/bin/bash") if shutil.which(s)]

# What a shell reads differently from a plain word, one piece each.
DIRTY = [";", "|", "&", "&&", "||", "$", "$x", "${IFS}", "$(id)", "`id`", "'", '"', "''", "\\", "\\\n", "\n",
         "\r", "\t", "\x00", "\x1b", "\x7f", ">", ">>", "<", "<<", "*", "?", "[", "]", "{", "}", "{a,b}", "~",
         "#", "!", "(", ")", "^", "é", "\u00a0", "\u2028", "\u200b", "\uff1b", "\U0001f600"]
# Characters outside the alphabet, any of them.
OUTSIDE = st.characters(codec=None).filter(lambda c: c != " " and not re.fullmatch(r"[A-Za-z0-9_./=:,@%+-]", c))


@pytest.fixture(scope="module")
def engines():
    bundle = load_bundle(ROOT / "rego", ROOT / "policies")
    ours = EmbeddedEngine.from_bundle(bundle, "regate/decision", memo_size=0)
    opa = OpaEngine()
    for module in bundle.modules:
        opa.add_policy(module.name, module.source)
    opa.add_data(bundle.data)
    yield ours, opa
    opa.close()


def decide(engines, command: str):
    ours, opa = engines
    doc = {
        "version": 1, "agent": {"id": "coder-7", "claims": {}},
        "tool": {"name": "shell", "route": "/tools/shell", "gpu": None},
        "request": {"method": "POST", "path": "/tools/shell/run", "query": {}, "headers": {},
                    "body": {"command": command}, "body_sha256": "", "size": 0},
        "mcp": None, "state": {}, "time_ns": 1,
    }
    a = ours.compiled.decide(doc)
    b = parse_decision(opa.eval_document("regate.decision", doc))
    assert a.to_dict() == b.to_dict(), repr(command)
    return a


words = st.text(alphabet=ALPHABET, min_size=1, max_size=6)
heads = st.sampled_from(sorted(COMMANDS) + ["rm", "sh", "env", "git push", "python", "/bin/ls", "x=1"])
flags = st.sampled_from(["-la", "-n", "5", "-5", "-q", "--stat", "--oneline", "-rn", "-f", "-p", "src/a.py",
                         "/workspace", "/workspace/a", "/etc/passwd", "/", "..", "a/../b", "HEAD", "x=y"])


@st.composite
def plain_commands(draw) -> str:
    """Commands of plain words: listed ones (often allowed), and near misses."""
    parts = [draw(heads)] + draw(st.lists(st.one_of(flags, words), max_size=5))
    return " ".join(parts)


@st.composite
def dirty_commands(draw) -> str:
    """A plain command with at least one piece a shell would read differently, anywhere."""
    parts = draw(plain_commands()).split(" ")
    for _ in range(draw(st.integers(1, 3))):
        piece = draw(st.one_of(st.sampled_from(DIRTY), OUTSIDE))
        i = draw(st.integers(0, len(parts)))
        if draw(st.booleans()) and i < len(parts):
            word = parts[i]
            j = draw(st.integers(0, len(word)))
            parts[i] = word[:j] + piece + word[j:]
        else:
            parts.insert(i, piece)
    return " ".join(parts)


@st.composite
def badly_spaced(draw) -> str:
    cmd = draw(plain_commands())
    where = draw(st.sampled_from(["start", "end", "double"]))
    if where == "start":
        return " " + cmd
    if where == "end":
        return cmd + " "
    return cmd.replace(" ", "  ", 1) if " " in cmd else cmd + "  x"


def shell_argv(shell: str, command: str) -> list[str]:
    """The words a real shell makes of `command`, which only ever is plain words here:
    `set --` assigns them as arguments, nothing runs them."""
    assert PLAIN.fullmatch(command)  # never hand a shell anything else
    out = subprocess.run([shell, "-c", f"set -- {command}; printf '%s\\0' \"$@\""], capture_output=True,
                         timeout=10, check=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    return out.stdout.decode().split("\0")[:-1]


def assert_means_its_words(command: str) -> None:
    argv = command.split(" ")
    assert PLAIN.fullmatch(command), repr(command)
    assert shlex.split(command, posix=True) == argv
    for sh in SHELLS:
        assert shell_argv(sh, command) == argv, (sh, command)
    keys = [" ".join(argv[:n]) for n in (3, 2, 1) if " ".join(argv[:n]) in COMMANDS]
    assert keys, f"{command!r}: its first words name no listed command"
    assert "/" not in argv[0]
    assert ".." not in command
    if "<path>" in COMMANDS[keys[0]].get("args", ""):  # echo's words are words, not paths
        for word in argv[len(keys[0].split(" ")):]:
            assert not word.startswith("/") or word == "/workspace" or word.startswith("/workspace/"), command


@FUZZ
@given(dirty_commands())
def test_a_command_with_anything_a_shell_reads_differently_is_refused(engines, command):
    d = decide(engines, command)
    assert not d.allow
    assert any("The shell tool runs one plain command per call" in r for r in d.reasons), (command, d.reasons)


@FUZZ
@given(badly_spaced())
def test_an_empty_word_is_refused(engines, command):
    d = decide(engines, command)
    assert not d.allow
    assert any("has an empty word" in r for r in d.reasons), (command, d.reasons)


@FUZZ
@given(plain_commands())
def test_an_allowed_command_means_exactly_its_words(engines, command):
    d = decide(engines, command)
    if d.allow:
        assert_means_its_words(command)
    else:
        assert d.reasons and all(r.startswith(f"The command '{command}' was refused: ") for r in d.reasons)


def test_seeded_commands_reach_both_outcomes_and_keep_both_properties(engines):
    # The properties above are only worth something if generated commands are
    # allowed often enough: the same building blocks, seeded, counted.
    rng = random.Random(18)
    pieces = sorted(COMMANDS) + ["rm", "env", "git push", "-la", "-n", "5", "src/a.py", "/workspace/a", "/etc",
                                 "..", "HEAD", "--stat", "-q", "x=y"]
    allowed = refused = 0
    for _ in range(600):
        words_ = [rng.choice(sorted(COMMANDS))] + [
            rng.choice(pieces) if rng.random() < 0.6 else "".join(rng.choices(ALPHABET, k=rng.randint(1, 5)))
            for _ in range(rng.randint(0, 4))]
        command = " ".join(words_)
        if rng.random() < 0.3:
            i = rng.randint(0, len(command))
            command = command[:i] + rng.choice(DIRTY) + command[i:]
        d = decide(engines, command)
        if d.allow:
            allowed += 1
            assert_means_its_words(command)
        else:
            refused += 1
            assert d.reasons
            if not PLAIN.fullmatch(command):
                assert any("one plain command per call" in r or "has an empty word" in r for r in d.reasons)
    assert allowed >= 100 and refused >= 100, (allowed, refused)


def test_real_shells_are_there_to_check_against():
    assert SHELLS, "install dash or bash: the equivalence is checked against a real shell"
