# Tests of the shell allowlist (rego/tools/shell.rego, data.tools.shell).
# call(), shell(), decide() and denied_with() are in regate_test.rego.
package regate_test

allowed_command(command) if {
	d := decide(shell("coder-7", command))
	d.allow
	count(d.reasons) == 0
}

test_shell_listed_commands_with_listed_arguments if {
	allowed_command("pwd")
	allowed_command("ls")
	allowed_command("ls -la src/")
	allowed_command("cat -n /workspace/notes.md")
	allowed_command("head -n 20 README.md")
	allowed_command("tail -5 build.log")
	allowed_command("wc -l src/app.py")
	allowed_command("grep -rn TODO src")
	allowed_command("git status -s")
	allowed_command("git log --oneline -n 5")
	allowed_command("git diff --stat HEAD")
	allowed_command("git show HEAD:src/app.py")
	allowed_command("python -m pytest -q tests/test_app.py::test_one")
	allowed_command("pytest -x --tb=short tests")
	allowed_command("echo build=ok 100% a,b @x +y")
}

test_shell_every_word_outside_the_alphabet_is_refused if {
	not_plain := [
		"rm\t-rf /", "ls;rm -rf /", "ls\nrm -rf /", "ls\\\nrm", "\\rm -rf /", "'rm' -rf /", "r''m -rf /",
		"\"rm\" -rf /", "$(echo rm) -rf /", "`echo rm` -rf /", "x=rm;$x -rf /", "ls | sh", "ls > /dev/sda",
		"ls < /etc/passwd", "ls &", "ls *", "ls ?", "ls [a]", "ls {a,b}", "ls ~", "ls #x", "ls !x",
		"ls\u00a0-la", "ls -la\u200b", "ls\u0000", "ls\r", "ls é",
	]
	every command in not_plain {
		denied_with(shell("coder-7", command), "The shell tool runs one plain command per call")
	}
}

test_shell_names_the_character_it_refuses if {
	denied_with(shell("coder-7", "ls;rm"), "contains the character ';'")
	denied_with(shell("coder-7", "$(id)"), "contains the character '$'")
	denied_with(shell("coder-7", "ls\nrm"), "contains a control character")
	denied_with(shell("coder-7", "ls é"), "outside ASCII")
	denied_with(shell("coder-7", "ls  -la"), "has an empty word")
	denied_with(shell("coder-7", " ls"), "has an empty word")
	denied_with(shell("coder-7", "ls "), "has an empty word")
	denied_with(shell("coder-7", ""), "it is empty")
}

test_shell_refuses_programs_that_are_not_listed if {
	every command in [
		"/bin/rm -rf /", "sh -c ls", "eval ls", "env rm -rf /", "nice rm x", "timeout 1 rm x",
		"exec rm x", "command rm x", "sudo -u root rm x", "xargs rm", "find / -delete", "mke2fs /dev/sda",
		"shred /dev/sda", "tee /dev/sda", "systemctl poweroff", "kill -9 1", "chmod -R a+rwx /",
		"truncate -s 0 /etc/passwd", "mv /etc /tmp", "python -c x", "python", "git", "FOO=1 ls",
	] {
		denied_with(shell("coder-7", command), "is not a command the shell tool runs")
	}
}

test_shell_explains_why_a_program_is_not_listed if {
	denied_with(shell("coder-7", "/bin/ls"), "programs are named bare: 'ls', not '/bin/ls'")
	denied_with(shell("coder-7", "find . -name x"), "find runs other programs (-exec)")
	denied_with(shell("coder-7", "git push origin main"), "'git push' is not a command the shell tool runs")
	denied_with(shell("coder-7", "python -m pip install x"), "'python -m' is not a command")
}

test_shell_refuses_arguments_a_command_does_not_take if {
	denied_with(shell("coder-7", "ls /etc"), "'ls' does not take the argument '/etc'")
	denied_with(shell("coder-7", "cat /etc/passwd"), "'cat' does not take the argument '/etc/passwd'")
	denied_with(shell("coder-7", "cat /workspacex/a"), "does not take the argument '/workspacex/a'")
	denied_with(shell("coder-7", "tail -f app.log"), "'tail' does not take the argument '-f'")
	denied_with(shell("coder-7", "grep -f /etc/shadow x"), "'grep' does not take the argument '-f'")
	denied_with(shell("coder-7", "git diff --output=/workspace/x"), "'git diff' does not take the argument '--output=/workspace/x'")
	denied_with(shell("coder-7", "git log --ext-diff"), "does not take the argument '--ext-diff'")
	denied_with(shell("coder-7", "pytest -p evil"), "'pytest' does not take the argument '-p'")
	denied_with(shell("coder-7", "pwd -P"), "'pwd' does not take the argument '-P'")
	denied_with(shell("coder-7", "ls x=/etc"), "does not take the argument 'x=/etc'")
}

test_shell_argument_refusal_shows_the_usage if {
	d := decide(shell("coder-7", "tail -f app.log"))
	d.reasons == {"The command 'tail -f app.log' was refused: 'tail' does not take the argument '-f'. Usage: tail [-n N | -c N | -N] PATH ... (a PATH is relative, or absolute under /workspace, and never contains '..')."}
}

test_shell_refuses_dot_dot_anywhere if {
	denied_with(shell("coder-7", "cat ../secrets"), "it contains '..'")
	denied_with(shell("coder-7", "cat /workspace/../etc/passwd"), "it contains '..'")
	denied_with(shell("coder-7", "git log main..HEAD"), "it contains '..'")
}

# The whole tool is replaced, not data.tools.shell.commands: OPA merges a
# `with` below a value the policy reached by a dynamic reference
# (data.tools[input.tool.name]) into that value, where regorus replaces it.
test_shell_rules_come_from_data if {
	cmds := {"make test": {"args": "-j[0-9]+", "usage": "make test [-jN]"}}
	tool := json.patch(data.tools.shell, [{"op": "replace", "path": "/commands", "value": cmds}])
	d := decide(shell("coder-7", "make test -j4")) with data.tools.shell as tool
	d.allow
	denied_with(shell("coder-7", "ls"), "It runs: make test.") with data.tools.shell as tool
	denied_with(shell("coder-7", "make test -k"), "Usage: make test [-jN].") with data.tools.shell as tool
}

test_shell_refuses_when_its_settings_cannot_decide if {
	tool := object.remove(data.tools.shell, ["path"])
	d := decide(shell("coder-7", "ls src")) with data.tools.shell as tool
	d.reasons == {"The command 'ls src' was refused: the shell tool's settings (data.tools.shell: commands, path) do not allow it."}
}

test_shell_refuses_arguments_it_does_not_judge if {
	d := data.regate.decision with input as {
		"agent": {"id": "coder-7"}, "tool": {"name": "shell", "route": "/tools/shell"},
		"request": {"method": "POST", "path": "/tools/shell/run", "arguments": {"command": "ls", "cwd": "/etc"}},
	}
	not d.allow
	some r in d.reasons
	contains(r, "'cwd'")
}

test_shell_judges_query_arguments if {
	d := data.regate.decision with input as {
		"agent": {"id": "coder-7"}, "tool": {"name": "shell", "route": "/tools/shell"},
		"request": {"method": "POST", "path": "/tools/shell/run", "body": {"command": "ls"},
			"arguments": {"command": "rm -rf /"}},
	}
	not d.allow
}
