# Argument rules of the `files` tool: an agent stays under its path prefix.
#
# The file a call touches is the request path after the tool's route
# (GET /tools/files/workspace/a.txt -> /workspace/a.txt), or the `path`
# argument of an MCP tools/call.
#
# Rules of package regate are named by full path (data.regate.args): an
# `import data.regate` here would make regorus see a cycle between the
# two packages (OPA would not mind; the conformance tests record it).
package regate.tools.files

path := data.regate.args.path if {
	input.mcp.method == "tools/call"
} else := trim_prefix(input.request.path, input.tool.route) if {
	is_string(input.tool.route)
} else := input.request.path

# Where this agent's files live: the grant's own root, else the tool's
# (policies/tools/data.yaml), else /workspace/.
root := object.get(data.regate.grant, "root", object.get(data.regate.tool, "root", "/workspace/"))

deny contains "The files tool needs a path: /tools/files/<path>, or a 'path' argument over MCP." if {
	not has_path
}

has_path if is_string(path)

deny contains msg if {
	is_string(path)
	not startswith(path, root)
	msg := sprintf(
		"The path '%s' is outside '%s'; agent '%s' may only touch files under '%s'.",
		[path, root, input.agent.id, root],
	)
}

# `..` would climb out of the root after the prefix check, and a %-encoded
# dot may be decoded by the tool after Regate has looked at the path.
deny contains msg if {
	is_string(path)
	escapes(path)
	msg := sprintf("The path '%s' contains '..' or an encoded dot; use a plain path under '%s'.", [path, root])
}

escapes(p) if ".." in split(p, "/")

escapes(p) if contains(lower(p), "%2e")
