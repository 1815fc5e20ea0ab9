# Tests of the MCP method allowlist (rego/mcp.rego). mcp_call() is in regate_test.rego.
package regate_test

# A JSON-RPC message as Regate's MCP stage hands it to the policy: input.mcp
# says what it is, the request body is the message.
rpc(agent, method, params) := object.union(call(agent, "tickets", "POST", "/tools/tickets/mcp", {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}), {"mcp": {
	"method": method,
	"id": 1,
	"tool": null,
	"arguments": null,
	"purpose": null,
}})

resource_grant := {
	"methods": ["POST"], "mcp_methods": ["initialize", "resources/read", "prompts/get"],
	"mcp_resources": ["tickets://open/"], "mcp_prompts": ["triage"],
}

test_mcp_methods_in_the_grant if {
	every method in ["initialize", "notifications/initialized", "server/discover", "ping", "tools/list", "notifications/cancelled"] {
		decide(rpc("support-1", method, {})).allow
	}
}

test_mcp_method_spelled_otherwise_is_refused if {
	d := decide(json.patch(mcp_call("support-1", "search_tickets"), [{"op": "replace", "path": "/mcp/method", "value": "Tools/Call"}]))
	not d.allow
	d.reasons == {"Agent 'support-1' may not send the MCP method 'Tools/Call' to 'tickets' (methods are matched exactly as spelled); it may send: initialize, notifications/initialized, server/discover, ping, tools/list, tools/call, notifications/cancelled."}
	denied_with(rpc("support-1", "tools/call ", {}), "the MCP method 'tools/call '")
}

test_resources_and_prompts_need_their_own_grant if {
	denied_with(rpc("support-1", "resources/read", {"uri": "tickets://open/1"}), "may not send the MCP method 'resources/read'")
	denied_with(rpc("support-1", "resources/list", {}), "may not send the MCP method 'resources/list'")
	denied_with(rpc("support-1", "prompts/get", {"name": "triage"}), "may not send the MCP method 'prompts/get'")
	denied_with(rpc("support-1", "completion/complete", {}), "may not send the MCP method 'completion/complete'")
}

test_resources_by_uri_prefix if {
	decide(rpc("support-1", "resources/read", {"uri": "tickets://open/7"})).allow with data.agents["support-1"].tools.tickets as resource_grant
	denied_with(rpc("support-1", "resources/read", {"uri": "file:///etc/passwd"}), "may not read the MCP resource 'file:///etc/passwd'") with data.agents["support-1"].tools.tickets as resource_grant
	denied_with(rpc("support-1", "resources/read", {"uri": "tickets://open/../closed/1"}), "without '..'") with data.agents["support-1"].tools.tickets as resource_grant
	denied_with(rpc("support-1", "resources/read", {"uri": "tickets://open/%2E%2E/closed"}), "an encoded dot") with data.agents["support-1"].tools.tickets as resource_grant
	denied_with(rpc("support-1", "resources/read", {}), "the MCP resource 'null'") with data.agents["support-1"].tools.tickets as resource_grant
}

test_prompts_by_name if {
	decide(rpc("support-1", "prompts/get", {"name": "triage"})).allow with data.agents["support-1"].tools.tickets as resource_grant
	denied_with(rpc("support-1", "prompts/get", {"name": "jailbreak"}), "may not get the MCP prompt 'jailbreak' on 'tickets'; it may get: triage.") with data.agents["support-1"].tools.tickets as resource_grant
}

test_a_grant_without_mcp_methods_allows_no_message if {
	g := {"methods": ["POST"], "mcp_tools": ["search_tickets"]}
	denied_with(rpc("support-1", "initialize", {}), "it may send: nothing (the grant lists none).") with data.agents["support-1"].tools.tickets as g
	denied_with(mcp_call("support-1", "search_tickets"), "may not send the MCP method 'tools/call'") with data.agents["support-1"].tools.tickets as g
}

test_a_grant_without_mcp_tools_allows_no_tool if {
	g := {"methods": ["POST"], "mcp_methods": ["tools/call"]}
	denied_with(mcp_call("support-1", "search_tickets"), "it may call: nothing (the grant lists none).") with data.agents["support-1"].tools.tickets as g
}

test_messages_without_a_method_are_judged_by_http_method if {
	# A GET (the server's stream), a DELETE, or a client's response: input.mcp.method is null.
	get := json.patch(call("support-1", "tickets", "GET", "/tools/tickets/mcp", null), [{"op": "replace", "path": "/mcp", "value": {"method": null, "id": null, "tool": null, "arguments": null, "purpose": null}}])
	decide(get).allow
	denied_with(json.patch(get, [{"op": "replace", "path": "/request/method", "value": "PUT"}]), "only with POST, GET, DELETE, not with 'PUT'")
}

test_no_grant_gives_one_reason if {
	d := decide(rpc("analyst-2", "ping", {}))
	d.reasons == {"Agent 'analyst-2' has no grant for the tool 'tickets'. An operator can add one under 'analyst-2' in policies/agents/data.yaml."}
}

test_a_public_mcp_tool_grants_its_listed_methods if {
	pub := {"public": true, "methods": ["POST"], "mcp_methods": ["ping"]}
	decide(rpc("anyone", "ping", {})).allow with data.tools.tickets as pub
	denied_with(rpc("anyone", "tools/list", {}), "may not send the MCP method 'tools/list'") with data.tools.tickets as pub
}
