# Argument rules of the `shell` tool: refuse destructive commands.
#
# The patterns, and what each one means, live in policies/tools.yaml
# (data.tools.shell.destructive), so operators extend the list without
# touching Rego. A blocklist cannot be complete: run the shell tool in a
# sandbox as well. This stops the obvious disasters an agent proposes.
#
# Rules of package regate are named by full path (data.regate.args): an
# `import data.regate` here would make regorus see a cycle between the
# two packages (OPA would not mind; the conformance tests record it).
package regate.tools.shell

deny contains "The shell tool needs a string argument 'command'." if {
	not has_command
}

has_command if is_string(data.regate.args.command)

# All patterns joined into one regular expression, (?:p1)|(?:p2)|..., are
# tried first: a harmless command, the common case, costs one match instead
# of one per pattern. Only a command that matches is checked pattern by
# pattern, to name what it looks like.
deny contains msg if {
	command := data.regate.args.command
	patterns := data.regate.tool.destructive
	regex.match(concat("", ["(?:", concat(")|(?:", [p.pattern | some p in patterns]), ")"]), command)
	some p in patterns
	regex.match(p.pattern, command)
	msg := sprintf(
		"The command '%s' was refused: it looks like %s. Destructive commands are not allowed through the shell tool; find a non-destructive way or ask a human.",
		[command, p.what],
	)
}
