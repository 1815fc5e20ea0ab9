# Tests of the example policy: `regate policy test` (or `opa test rego/
# policies/`) runs every test_* rule; a test passes when it is true.
#
# Each test builds an input document with call() and evaluates the decision
# `with input as` that document; `with data.agents as {...}` swaps the agent
# list, so a test does not depend on who is in policies/agents/data.yaml today.
package regate_test

import data.regate

# An input document as Regate's policy stage builds it (README.md, "The input document").
call(agent, tool, method, path, body) := {
	"version": 1,
	"agent": {"id": agent, "claims": {}},
	"tool": {"name": tool, "route": concat("", ["/tools/", tool]), "gpu": null},
	"request": {
		"method": method,
		"path": path,
		"query": {},
		"headers": {"content-type": "application/json"},
		"body": body,
		"body_sha256": "",
		"size": 0,
	},
	"mcp": null,
	"state": {"breaker": "closed", "recent_failures": 0, "budget_left": 40.0},
	"time_ns": 1767225600000000000,
}

shell(agent, command) := call(agent, "shell", "POST", "/tools/shell/run", {"command": command})

pay(agent, amount) := call(agent, "payments", "POST", "/tools/payments/pay", {"amount": amount, "to": "ACME"})

decide(inp) := d if {
	d := regate.decision with input as inp
}

denied_with(inp, fragment) if {
	d := decide(inp)
	d.allow == false
	some reason in d.reasons
	contains(reason, fragment)
}

# --- grants ------------------------------------------------------------------

test_public_tool_open_to_every_identified_agent if {
	decide(call("someone-new", "search", "GET", "/tools/search/q", null)).allow
	decide(call("someone-new", "echo", "POST", "/tools/echo/", {"x": 1})).allow
}

test_public_tool_methods_still_apply if {
	denied_with(call("someone-new", "search", "DELETE", "/tools/search/q", null), "only with GET, POST")
}

test_agent_without_grant_is_refused if {
	denied_with(shell("analyst-2", "ls"), "no grant for the tool 'shell'")
}

test_unknown_agent_is_refused if {
	denied_with(shell("intruder", "ls"), "Agent 'intruder' has no grant")
}

test_call_without_identity_is_refused if {
	inp := json.patch(shell("x", "ls"), [{"op": "replace", "path": "/agent", "value": {"claims": {}}}])
	denied_with(inp, "no agent identity")
}

test_method_outside_grant_is_refused if {
	denied_with(call("coder-7", "shell", "GET", "/tools/shell/run", {"command": "ls"}), "only with POST, not with 'GET'")
}

test_grants_come_from_data if {
	d := decide(shell("new-agent", "ls")) with data.agents as {"new-agent": {"tools": {"shell": {"methods": ["POST"]}}}}
	d.allow
}

# --- shell (more in shell_test.rego) -------------------------------------------

test_shell_allows_a_listed_command if {
	d := decide(shell("coder-7", "ls -la /workspace"))
	d.allow
	count(d.reasons) == 0
}

test_shell_refuses_two_commands_in_one if {
	denied_with(shell("coder-7", "ls -la /workspace && grep -r TODO src/"), "contains the character '&'")
}

test_shell_refuses_recursive_delete if {
	denied_with(shell("coder-7", "rm -rf /"), "recursive deletion")
	denied_with(shell("coder-7", "cd /tmp && rm -r -f build"), "contains the character '&'")
	denied_with(shell("coder-7", "rm --recursive --force ~"), "contains the character '~'")
}

test_shell_refuses_unlisted_programs_even_harmless_ones if {
	denied_with(shell("coder-7", "rm notes.txt"), "'rm' is not a command the shell tool runs")
	denied_with(shell("coder-7", "df -h"), "It runs: cat, echo, git diff,")
}

test_shell_refuses_mkfs_dd_and_disk_writes if {
	denied_with(shell("coder-7", "mkfs.ext4 /dev/sdb1"), "'mkfs.ext4' is not a command the shell tool runs")
	denied_with(shell("coder-7", "dd if=/dev/zero of=/dev/sda bs=1M"), "dd writes raw bytes")
	denied_with(shell("coder-7", "cat image > /dev/nvme0n1"), "contains the character '>'")
}

test_shell_refuses_shutdown_and_fork_bomb if {
	denied_with(shell("coder-7", "sudo shutdown -h now"), "sudo runs a command as another user")
	denied_with(shell("coder-7", ":(){ :|:& };:"), "contains the character '('")
}

test_shell_needs_a_command if {
	denied_with(call("coder-7", "shell", "POST", "/tools/shell/run", {"cmd": "ls"}), "needs a string argument 'command'")
	denied_with(call("coder-7", "shell", "POST", "/tools/shell/run", {"command": ["ls"]}), "needs a string argument 'command'")
}

test_shell_refusal_names_the_command_and_what_runs if {
	d := decide(shell("coder-7", "rm -rf /"))

	# reasons is a set: compare with a set literal ({...}), never an array.
	d.reasons == {"The command 'rm -rf /' was refused: 'rm' is not a command the shell tool runs (rm deletes files, recursive deletion included; delete one file through the files tool, or ask a human). It runs: cat, echo, git diff, git log, git show, git status, grep, head, ls, pwd, pytest, python -m pytest, tail, wc."}
}

# --- files -------------------------------------------------------------------

test_files_inside_the_workspace if {
	decide(call("coder-7", "files", "GET", "/tools/files/workspace/src/main.py", null)).allow
	decide(call("coder-7", "files", "PUT", "/tools/files/workspace/out.txt", null)).allow
}

test_files_outside_the_workspace if {
	denied_with(call("coder-7", "files", "GET", "/tools/files/etc/passwd", null), "outside '/workspace/'")
}

test_files_refuses_dot_dot if {
	denied_with(call("coder-7", "files", "GET", "/tools/files/workspace/../etc/shadow", null), "contains '..'")
	denied_with(call("coder-7", "files", "GET", "/tools/files/workspace/%2E%2E/etc/shadow", null), "encoded dot")
}

test_files_root_from_the_grant if {
	decide(call("analyst-2", "files", "GET", "/tools/files/workspace/reports/q3.csv", null)).allow
	denied_with(call("analyst-2", "files", "GET", "/tools/files/workspace/src/main.py", null), "outside '/workspace/reports/'")
}

# --- payments ----------------------------------------------------------------

test_small_payment_needs_no_approval if {
	d := decide(pay("analyst-2", 40))
	d.allow
	d.approval.required == false
}

test_large_payment_needs_a_human if {
	d := decide(pay("analyst-2", 250))
	d.allow
	d.approval.required
	contains(d.approval.reason, "250 USD is above the 100 USD")
}

test_payment_above_the_hard_limit_is_refused if {
	denied_with(pay("analyst-2", 9000), "above the limit of 5000 USD")
}

test_payment_needs_a_positive_amount if {
	denied_with(pay("analyst-2", "100"), "positive number argument 'amount'")
	denied_with(pay("analyst-2", -5), "positive number argument 'amount'")
}

# --- MCP ---------------------------------------------------------------------

mcp_call(agent, name) := object.union(call(agent, "tickets", "POST", "/tools/tickets/mcp", null), {"mcp": {
	"method": "tools/call",
	"tool": name,
	"arguments": {"query": "login"},
}})

test_mcp_tool_in_the_grant if {
	decide(mcp_call("support-1", "search_tickets")).allow
}

test_mcp_tool_outside_the_grant if {
	denied_with(mcp_call("support-1", "delete_ticket"), "may not call the MCP tool 'delete_ticket'")
}

mcp_args(agent, name, args) := json.patch(mcp_call(agent, name), [{"op": "replace", "path": "/mcp/arguments", "value": args}])

# What Regate asks for each tool of a tools/list answer: no arguments yet.
mcp_listing(agent, name) := json.patch(mcp_call(agent, name), [
	{"op": "replace", "path": "/mcp/arguments", "value": null},
	{"op": "add", "path": "/mcp/purpose", "value": "tools/list"},
])

test_mcp_grants_differ_per_agent if {
	decide(mcp_call("coder-7", "search_tickets")).allow
	denied_with(mcp_call("coder-7", "add_comment"), "may call: search_tickets.")
	denied_with(mcp_call("analyst-2", "search_tickets"), "no grant for the tool 'tickets'")
}

test_mcp_listing_shows_granted_tools_without_arguments if {
	decide(mcp_listing("support-1", "add_comment")).allow
	decide(mcp_listing("support-1", "search_tickets")).allow
	denied_with(mcp_listing("support-1", "delete_ticket"), "may not call the MCP tool 'delete_ticket'")
	denied_with(mcp_listing("coder-7", "add_comment"), "may not call the MCP tool 'add_comment'")
}

test_mcp_argument_rules if {
	decide(mcp_args("support-1", "add_comment", {"ticket_id": 101, "text": "on it"})).allow
	denied_with(mcp_args("support-1", "add_comment", {"ticket_id": 101}), "needs a string argument 'text'")
	denied_with(mcp_args("support-1", "add_comment", null), "needs a string argument 'text'")
	long := concat("", [s | some _ in numbers.range(1, 2001); s := "x"])
	denied_with(mcp_args("support-1", "add_comment", {"ticket_id": 101, "text": long}), "2001 characters")
}

test_mcp_methods_other_than_tools_call if {
	inp := json.patch(mcp_call("coder-7", "x"), [{"op": "replace", "path": "/mcp", "value": {"method": "tools/list", "tool": null, "arguments": null}}])
	decide(inp).allow
}

# --- what the upstream sees --------------------------------------------------

test_headers_name_the_verified_agent if {
	d := decide(call("coder-7", "search", "GET", "/tools/search/q", null))
	d.headers.set == {"X-Regate-Agent": "coder-7"}
	d.headers.remove == ["X-Agent-Id"]
}

test_timeout_from_grant_then_tool if {
	decide(shell("coder-7", "ls")).timeout_ms == 10000
	decide(shell("coder-7", "ls")).timeout_ms == 30000 with data.agents["coder-7"].tools.shell as {"methods": ["POST"]}
	decide(call("coder-7", "search", "GET", "/tools/search/q", null)).timeout_ms == null
}

test_cost_from_tool_settings if {
	decide(call("coder-7", "search", "GET", "/tools/search/q", null)).cost == 1
	decide(call("coder-7", "files", "GET", "/tools/files/workspace/a", null)).cost == null

	# A payment costs its amount (payments_test.rego), a refused one the tool's cost.
	decide(pay("analyst-2", 10)).cost == 10
	decide(pay("analyst-2", "10")).cost == 5
}
