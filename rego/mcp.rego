# MCP messages: which JSON-RPC methods an agent may send to an MCP route, and
# which tools, resources and prompts those methods may name.
#
# An MCP server is one route with many capabilities behind one HTTP method
# (POST), so the HTTP grant says little. A grant on an MCP route lists, in
# policies/agents/data.yaml:
#
#   mcp_methods    the JSON-RPC methods the agent may send, spelled exactly:
#                  initialize, notifications/initialized, server/discover, ping,
#                  tools/list, tools/call, notifications/cancelled, ... Nothing
#                  is implied: resources/* and prompts/* need entries of their
#                  own, and 'Tools/Call' is not 'tools/call' (a server may read
#                  both the same; the policy must not guess).
#   mcp_tools      the tools (params.name) a tools/call may name
#   mcp_resources  URI prefixes a resources/read, resources/subscribe or
#                  resources/unsubscribe may name (params.uri)
#   mcp_prompts    the prompts (params.name) a prompts/get may name
#
# Each list is an allowlist: absent or empty, nothing is allowed. Regate judges
# each message of a JSON-RPC batch on its own, notifications included; a
# message's params are in input.request.body.params (the message itself).
# A GET (the server's event stream), a DELETE (end of session) and a client's
# response to a server's request carry no method (input.mcp.method is null):
# the grant's HTTP `methods` decide those.
#
# Hooked in from rego/regate.rego only when input.mcp.method is a string.
# Rules of package regate are named by full path (data.regate.grant): an
# `import data.regate` here would make regorus see a cycle between the two
# packages (OPA would not mind; the conformance tests record it).
package regate.mcp

method := input.mcp.method

# The rules below judge what a granted method names; a method the grant does
# not list is refused once, for that.
granted if method in data.regate.grant.mcp_methods

# The names an allowlist holds, for a reason; a reason never ends in ": .".
names(xs) := concat(", ", xs) if {
	count(xs) > 0
} else := "nothing (the grant lists none)"

deny contains msg if {
	grant := data.regate.grant
	grant != {}
	not granted
	allowed := object.get(grant, "mcp_methods", [])
	msg := sprintf(
		"Agent '%s' may not send the MCP method '%s' to '%s' (methods are matched exactly as spelled); it may send: %s.",
		[input.agent.id, method, input.tool.name, names(allowed)],
	)
}

deny contains msg if {
	method == "tools/call"
	granted
	grant := data.regate.grant
	allowed := object.get(grant, "mcp_tools", [])
	mcp_tool := object.get(input.mcp, "tool", "")
	not mcp_tool in allowed
	msg := sprintf(
		"Agent '%s' may not call the MCP tool '%s' on '%s'; it may call: %s.",
		[input.agent.id, mcp_tool, input.tool.name, names(allowed)],
	)
}

# Resources are named by URI; a grant lists the prefixes the agent may read.
resource_methods := {"resources/read", "resources/subscribe", "resources/unsubscribe"}

deny contains msg if {
	method in resource_methods
	granted
	grant := data.regate.grant
	prefixes := object.get(grant, "mcp_resources", [])
	uri := param("uri")
	not granted_uri(uri, prefixes)
	msg := sprintf(
		"Agent '%s' may not read the MCP resource '%v' on '%s'; it may read URIs without '..' or an encoded dot, starting with: %s.",
		[input.agent.id, uri, input.tool.name, names(prefixes)],
	)
}

# One of the message's params (the message is the request body), null when absent.
param(key) := v if {
	v := input.request.body.params[key]
} else := null

# `..` and a %-encoded dot could climb out of a prefix once the server decodes the URI.
granted_uri(uri, prefixes) if {
	is_string(uri)
	not contains(uri, "..")
	not contains(lower(uri), "%2e")
	some p in prefixes
	startswith(uri, p)
}

deny contains msg if {
	method == "prompts/get"
	granted
	grant := data.regate.grant
	allowed := object.get(grant, "mcp_prompts", [])
	name := param("name")
	not name in allowed
	msg := sprintf(
		"Agent '%s' may not get the MCP prompt '%v' on '%s'; it may get: %s.",
		[input.agent.id, name, input.tool.name, names(allowed)],
	)
}
