# Argument rules of the `shell` tool: an allowlist of plain commands.
#
# Rego has no shell lexer, and a policy that guesses how a shell will read a
# string loses to the first spelling it did not foresee (`\rm`, `r''m`,
# `$(echo rm)`, a newline, `sh -c`, `env rm`, ...). So this policy accepts
# only commands whose shell meaning is trivially exact:
#
# 1. Plain words. A command is words of ASCII letters, digits and the
#    characters _ . / = : , @ % + - separated by single spaces. No quote,
#    backslash, `$`, backtick, redirection, pipe, `;`, `&`, glob, `~`, brace,
#    newline, tab, control or non-ASCII character: nothing a shell would
#    expand, split or reinterpret. With no quoting possible, splitting on " "
#    gives exactly the argv a POSIX shell (and Python's shlex.split) gives.
# 2. Listed commands. The first one, two or three words must name a command
#    of data.tools.shell.commands (policies/tools/data.yaml): `ls`, `git status`,
#    `python -m pytest`. Programs are named bare (`ls`, never `/bin/ls`), so a
#    path cannot pick another program than the one listed.
# 3. Listed arguments. Every further word must match the command's `args`, a
#    regular expression (anchored to the whole word) in which <path> stands for
#    data.tools.shell.path: a relative path, or one under /workspace. No word
#    may contain `..`.
#
# The tool should run the argv (shlex.split(command)) without a shell, as
# examples/demo_tool.py does; then (1) costs nothing and (2) and (3) are
# exactly what runs. This decides which program starts with which words, not
# what the program then does (pytest runs the workspace's code): run the
# shell tool in a sandbox as well.
#
# Regular expressions here and in the data use explicit ASCII classes only:
# `\s`, `\w`, `\d` and `\b` are Unicode in regorus and ASCII in OPA, and the
# policy must decide the same in both.
#
# Rules of package regate are named by full path (data.regate.args): an
# `import data.regate` here would make regorus see a cycle between the
# two packages (OPA would not mind; the conformance tests record it).
package regate.tools.shell

# One rule on the common path: an allowed command is checked by `allowed`
# alone; only a refused one is taken apart by the rules of `refusals`, to say
# what is wrong with it.
deny contains msg if {
	not allowed
	some msg in refusals
}

# Never allowed by silence: should the data leave `allowed` and every refusal
# undecided (no `path`, an `args` pattern that splits words), still refuse.
deny contains msg if {
	not allowed
	count(refusals) == 0
	msg := sprintf(
		"The command '%s' was refused: the shell tool's settings (data.tools.shell: commands, path) do not allow it.",
		[command],
	)
}

allowed if {
	only_command
	plain
	not contains(command, "..")
	key := entry_key
	rest := trim_prefix(trim_prefix(command, key), " ")
	one := arg_pattern(commands[key])
	regex.match(concat("", ["^(?:(?:", one, ")(?: (?:", one, "))*)?$"]), rest)
}

refusals contains "The shell tool needs a string argument 'command'." if {
	not has_command
}

has_command if command

# `command` is the only argument: one the rules here do not read (`cwd`, `env`,
# `shell`), which a tool could act on, is refused rather than ignored.
only_command if {
	is_object(data.regate.args)
	count(data.regate.args) == 1
}

refusals contains msg if {
	has_command
	not only_command
	extra := sort([k | some k, _ in data.regate.args; k != "command"])
	count(extra) > 0
	msg := sprintf(
		"The shell tool takes one argument, 'command'; the call also sent %s, which this policy does not judge.",
		[concat(", ", [sprintf("'%v'", [k]) | some k in extra])],
	)
}

# The command, only when it is a string: every rule below may then assume one
# (a builtin given another type is an error in regorus, undefined in OPA).
command := c if {
	c := data.regate.args.command
	is_string(c)
}

# --- plain words ---------------------------------------------------------------

plain if {
	regex.match(`^[A-Za-z0-9_./=:,@%+-]+( [A-Za-z0-9_./=:,@%+-]+)*$`, command)
}

plain_words := "The shell tool runs one plain command per call: words of ASCII letters, digits and _ . / = : , @ % + - separated by single spaces, with no quotes, escapes, variables, substitutions, globs, redirections, pipes or command separators."

refusals contains msg if {
	has_command
	not plain
	msg := sprintf("The command '%s' was refused: it %s. %s", [command, problem, plain_words])
}

# What makes the command not plain: the first character outside the alphabet,
# named when it is printable ASCII; else the empty word.
problem := "is empty" if {
	command == ""
} else := sprintf("contains the character '%s'", [c]) if {
	c := regex.find_n(`[^A-Za-z0-9_./=:,@%+ -]`, command, 1)[0]
	regex.match(`^[!-~]$`, c)
} else := "contains a control character (a newline, a tab, ...) or a character outside ASCII" if {
	regex.match(`[^A-Za-z0-9_./=:,@%+ -]`, command)
} else := "has an empty word (a space at its start or end, or two spaces in a row)"

# --- which command ------------------------------------------------------------

argv := split(command, " ")

commands := data.regate.tool.commands

# The listed command this call runs: its first three, two or one words.
entry_key := k if {
	k := concat(" ", array.slice(argv, 0, 3))
	commands[k]
} else := k if {
	k := concat(" ", array.slice(argv, 0, 2))
	commands[k]
} else := argv[0] if {
	commands[argv[0]]
}

refusals contains msg if {
	plain
	not entry_key
	msg := sprintf(
		"The command '%s' was refused: '%s' is not a command the shell tool runs%s. It runs: %s.",
		[command, asked, why_not, concat(", ", sort([k | some k, _ in commands]))],
	)
}

# What the agent asked for: `git push` when git has listed subcommands, else
# the program.
asked := concat(" ", array.slice(argv, 0, 2)) if {
	count(argv) > 1
	some k, _ in commands
	startswith(k, concat("", [argv[0], " "]))
} else := argv[0]

# Why a program is not listed, when the data says (data.tools.shell.refused).
why_not := sprintf(" (%s)", [data.regate.tool.refused[argv[0]]]) if {
	is_string(data.regate.tool.refused[argv[0]])
} else := " (programs are named bare: 'ls', not '/bin/ls')" if {
	contains(argv[0], "/")
} else := ""

# --- which arguments ---------------------------------------------------------

# A command's `args`, with <path> spelled out: the pattern one word must match.
arg_pattern(entry) := replace(object.get(entry, "args", ""), "<path>", data.regate.tool.path)

refusals contains msg if {
	plain
	key := entry_key
	entry := commands[key]
	one := concat("", ["^(?:", arg_pattern(entry), ")$"])
	some arg in array.slice(argv, count(split(key, " ")), count(argv))
	not regex.match(one, arg)
	msg := sprintf(
		"The command '%s' was refused: '%s' does not take the argument '%s'. Usage: %s.",
		[command, key, arg, usage(object.get(entry, "usage", key))],
	)
}

# A usage line, with what a PATH may be when it takes one.
usage(u) := sprintf("%s (%s)", [u, data.regate.tool.paths_are]) if {
	contains(u, "PATH")
} else := u

refusals contains msg if {
	plain
	contains(command, "..")
	msg := sprintf(
		"The command '%s' was refused: it contains '..'. Name paths without '..' (%s).",
		[command, data.regate.tool.paths_are],
	)
}
