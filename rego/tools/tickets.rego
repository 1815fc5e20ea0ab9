# Argument rules of the `tickets` MCP server (examples/mcp_server.py): one
# route, several MCP tools; the tool is input.mcp.tool, its arguments
# data.regate.args (params.arguments of the tools/call).
#
# Limits: policies/tools/data.yaml, tickets.max_comment_chars.
package regate.tools.tickets

max_chars := object.get(data.regate.tool, "max_comment_chars", 2000)

# A helper rule, not `not is_string(data.regate.args.text)`: with the argument
# undefined, OPA leaves that negation undefined where regorus makes it true.
has_text if is_string(data.regate.args.text)

deny contains msg if {
	input.mcp.method == "tools/call"
	input.mcp.tool == "add_comment"
	not has_text
	msg := "The MCP tool 'add_comment' needs a string argument 'text'."
}

deny contains msg if {
	input.mcp.method == "tools/call"
	input.mcp.tool == "add_comment"
	text := data.regate.args.text
	is_string(text)
	count(text) > max_chars
	msg := sprintf("A comment of %d characters is longer than the %d allowed on tickets.", [count(text), max_chars])
}
