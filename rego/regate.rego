# Regate's example policy: which agent may call which tool, how, and with
# which arguments. Copy it and make it yours.
#
# Regate asks for data.regate.decision (config: policy.decision) once per call,
# with the input document of DESIGN.md ("The policy contract"):
#
#   input.agent.id / .claims      who is calling (set by Regate's identify stage)
#   input.tool.name / .route      which tool (from the route table in regate.yaml)
#   input.request.method / .path / .query / .headers / .body / .size
#   input.mcp                     for MCP routes: {method, id, tool, arguments, purpose}
#                                 (tool/arguments of a tools/call; purpose is "tools/list"
#                                 when Regate asks whether a listed tool may be shown)
#   input.state                   breaker state, recent failures, budget left
#   input.time_ns                 when the call arrived
#
# The data it reads lives in policies/ and is mounted by file name:
#   policies/agents.yaml -> data.agents   (agents and their tool grants)
#   policies/tools.yaml  -> data.tools    (per-tool settings)
#
# This file decides who may call which tool with which method. The rules about
# one tool's arguments live in rego/tools/<tool>.rego (package
# regate.tools.<tool>) and are hooked in at the bottom of this file.
#
# Written in Rego v1 (`if`, `contains`), which both the embedded engine
# (regorus) and OPA 1.x accept. `regate policy test` runs the tests in
# *_test.rego; `regate policy eval -i input.json` shows one input's decision.
#
# Performance: every call evaluates this policy, so it is written to touch
# few rules. Agents are looked up by id (an object lookup, never a loop over
# data.agents), so 100,000 agents cost what 10 do. Each extra rule that a call
# evaluates costs a few microseconds in the embedded engine; prefer local
# variables inside a rule body to small helper rules on the common path.
package regate

import data.regate.tools.files
import data.regate.tools.payments
import data.regate.tools.shell
import data.regate.tools.tickets

# The decision Regate applies. Only `allow` is required; Regate fills in a
# default for anything left out. `reasons` is a set: Regate returns it as a
# sorted list, so the agent always reads the same text for the same call.
decision := {
	# A call is allowed when nothing denies it. Every deny rule produces a
	# sentence, so a refused call always says why.
	"allow": count(deny) == 0,
	"reasons": deny,
	"approval": approval,
	# The tool learns who is calling from Regate, not from the agent: set the
	# verified agent id, drop the unauthenticated X-Agent-Id the agent sent.
	"headers": {
		"set": {"X-Regate-Agent": object.get(input.agent, "id", "")},
		"remove": ["X-Agent-Id"],
	},
	# A deadline for the upstream call: the grant's, else the tool's, else
	# null (the route's timeout_ms). Regate only ever lowers a deadline.
	"timeout_ms": object.get(grant, "timeout_ms", object.get(tool, "timeout_ms", null)),
	# Budget units one call spends; null: the route's cost from regate.yaml.
	"cost": object.get(tool, "cost", null),
}

# The tool's settings from policies/tools.yaml ({} for a tool without any).
default tool := {}

tool := data.tools[input.tool.name]

# --- Grants: who may call what, with which methods --------------------------

# The agent's own grant for the tool, else the public grant of a public tool
# (echo, search: every identified agent may call them), else {} (no grant).
default grant := {}

grant := g if {
	g := data.agents[input.agent.id].tools[input.tool.name]
} else := {"methods": tool.methods} if {
	tool.public == true
}

deny contains "The call carries no agent identity; Regate refuses calls it cannot attribute to an agent." if {
	not input.agent.id
}

deny contains msg if {
	grant == {}
	msg := sprintf(
		"Agent '%s' has no grant for the tool '%s'. An operator can add one under '%s' in policies/agents.yaml.",
		[input.agent.id, input.tool.name, input.agent.id],
	)
}

deny contains msg if {
	grant != {}
	allowed := object.get(grant, "methods", [])
	not input.request.method in allowed
	msg := sprintf(
		"Agent '%s' may call the tool '%s' only with %s, not with '%s'.",
		[input.agent.id, input.tool.name, concat(", ", allowed), input.request.method],
	)
}

# An MCP server is one route with many tools: a grant may name the MCP tools
# (params.name of tools/call) the agent may invoke there.
deny contains msg if {
	input.mcp.method == "tools/call"
	allowed := grant.mcp_tools
	mcp_tool := object.get(input.mcp, "tool", "")
	not mcp_tool in allowed
	msg := sprintf(
		"Agent '%s' may not call the MCP tool '%s' on '%s'; it may call: %s.",
		[input.agent.id, mcp_tool, input.tool.name, concat(", ", allowed)],
	)
}

# Regate filters every tools/list answer: for each listed tool it asks this
# policy about a hypothetical tools/call of that tool, with purpose
# "tools/list" and no arguments. A tool is shown when such a call would be
# allowed. Argument rules cannot apply yet (there are none), so the hooks below
# skip them while listing.
listing if input.mcp.purpose == "tools/list"

# --- Argument rules, one package per tool (rego/tools/) ----------------------

# The call's arguments: an MCP tools/call carries them in params.arguments,
# a plain HTTP call in its JSON body (null when the body is not JSON).
args := input.mcp.arguments if {
	input.mcp.method == "tools/call"
} else := input.request.body

# Each tool's own reasons to refuse. The name test comes first, so a call
# only evaluates the rules of the tool it calls. To give a new tool argument
# rules: add rego/tools/<tool>.rego, import it above, add a line here.
deny contains msg if {
	input.tool.name == "shell"
	some msg in shell.deny
}

deny contains msg if {
	input.tool.name == "files"
	some msg in files.deny
}

deny contains msg if {
	input.tool.name == "payments"
	some msg in payments.deny
}

deny contains msg if {
	input.tool.name == "tickets"
	not listing
	some msg in tickets.deny
}

# A human approval, when a tool's rules ask for one (payments above a
# threshold): Regate holds the call, or answers 202, until an approver decides.
default approval := {"required": false, "reason": ""}

approval := payments.approval if input.tool.name == "payments"
