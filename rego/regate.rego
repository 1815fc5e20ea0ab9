# Regate's example policy: which agent may call which tool, how, and with
# which arguments. Copy it and make it yours.
#
# It is written as allowlists, because blocklists lose: an agent (or whoever
# steers it) needs one spelling the list did not foresee. Every rule here names
# what is allowed, and everything else is refused with a reason that says
# what was refused and what is allowed instead.
#
# Regate asks for data.regate.decision (config: policy.decision) once per call,
# with the input document of README.md ("The input document"):
#
#   input.agent.id / .claims      who is calling (set by Regate's identify stage)
#   input.tool.name / .route      which tool (from the route table in regate.yaml)
#   input.request.method / .path / .query / .query_pairs / .headers / .body
#                 / .arguments / .size   (arguments: what the tool acts on)
#   input.mcp                     for MCP routes: {method, id, tool, arguments, purpose}
#                                 (null on plain HTTP routes; method is null for a GET,
#                                 a DELETE or a client's response; tool/arguments belong
#                                 to a tools/call; purpose is "tools/list" when Regate
#                                 asks whether a listed tool may be shown)
#   input.state                   breaker state, recent failures, budget left
#   input.time_ns                 when the call arrived
#
# The data it reads lives in policies/ and is mounted as OPA mounts it, by
# the directory each data.yaml sits in:
#   policies/agents/data.yaml -> data.agents   (agents and their tool grants)
#   policies/tools/data.yaml  -> data.tools    (per-tool settings)
#   policies/limits/data.yaml -> data.limits   (rates and budgets; Regate enforces them)
#
# This file decides who may call which tool with which method. The rules about
# MCP messages live in rego/mcp.rego, the rules about one tool's arguments in
# rego/tools/<tool>.rego (package regate.tools.<tool>); all are hooked in at
# the bottom of this file.
#
# Written in Rego v1 (`if`, `contains`), which both the embedded engine
# (regorus) and OPA 1.x accept. `regate policy test` runs the tests in
# *_test.rego; `regate policy eval -i input.json` shows one input's decision.
#
# Performance: every call evaluates this policy, so it is written to touch
# few rules. Agents are looked up by id (an object lookup, never a loop over
# data.agents), so 100,000 agents cost what 10 do. Each extra rule that a call
# evaluates costs a few microseconds in the embedded engine; prefer local
# variables inside a rule body to small helper rules on the common path, and
# hook a package in behind one cheap test (the tool's name, an MCP method).
# Other packages are named by full path (data.regate.tools.shell.deny), not
# through an `import`: through an import alias regorus evaluated every rule of
# the package, helpers included, which doubled the cost of a shell call.
package regate

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
	"cost": cost,
	# Limits for this call on top of policies/limits/data.yaml, on keys of their
	# own (same spellings: a rate, or a budget {units, window}); null: none.
	"limits": limits,
}

# The tool's settings from policies/tools/data.yaml ({} for a tool without any).
default tool := {}

tool := data.tools[input.tool.name]

cost := data.regate.tools.payments.cost if {
	input.tool.name == "payments"
} else := object.get(tool, "cost", null)

default limits := null

limits := data.regate.tools.payments.limits if input.tool.name == "payments"

# --- Grants: who may call what, with which methods --------------------------

# The agent's own grant for the tool, else the public grant of a public tool
# (echo, search: every identified agent may call them), else {} (no grant).
# A public MCP tool's settings may list mcp_methods and mcp_tools as well.
default grant := {}

grant := g if {
	g := data.agents[input.agent.id].tools[input.tool.name]
} else := object.filter(tool, ["methods", "mcp_methods", "mcp_tools", "mcp_resources", "mcp_prompts"]) if {
	tool.public == true
}

deny contains "The call carries no agent identity; Regate refuses calls it cannot attribute to an agent." if {
	not input.agent.id
}

deny contains msg if {
	grant == {}
	msg := sprintf(
		"Agent '%s' has no grant for the tool '%s'. An operator can add one under '%s' in policies/agents/data.yaml.",
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

# Regate filters every tools/list answer: for each listed tool it asks this
# policy about a hypothetical tools/call of that tool, with purpose
# "tools/list" and no arguments. A tool is shown when such a call would be
# allowed. Argument rules cannot apply yet (there are none), so the hooks below
# skip them while listing.
listing if input.mcp.purpose == "tools/list"

# --- MCP messages (rego/mcp.rego) --------------------------------------------

# A JSON-RPC message on an MCP route: its method must be one the grant lists,
# spelled exactly. Plain HTTP calls (input.mcp null) stop at the first test.
deny contains msg if {
	is_string(input.mcp.method)
	some msg in data.regate.mcp.deny
}

# --- Argument rules, one package per tool (rego/tools/) ----------------------

# The call's arguments: an MCP tools/call carries them in params.arguments, a
# plain HTTP call in input.request.arguments — what the tool acts on, from the
# place its `arguments` setting names (the JSON body, the query, or both merged;
# Regate has refused a key given in both). An input written by hand without
# `arguments` (regate policy eval -i) falls back to the body.
args := input.mcp.arguments if {
	input.mcp.method == "tools/call"
} else := object.get(input.request, "arguments", object.get(input.request, "body", null))

# Each tool's own reasons to refuse. The name test comes first, so a call
# only evaluates the rules of the tool it calls. To give a new tool argument
# rules: add rego/tools/<tool>.rego, import it above, add a line here.
deny contains msg if {
	input.tool.name == "shell"
	some msg in data.regate.tools.shell.deny
}

deny contains msg if {
	input.tool.name == "files"
	some msg in data.regate.tools.files.deny
}

deny contains msg if {
	input.tool.name == "payments"
	some msg in data.regate.tools.payments.deny
}

deny contains msg if {
	input.tool.name == "tickets"
	not listing
	some msg in data.regate.tools.tickets.deny
}

# A human approval, when a tool's rules ask for one (payments above a
# threshold): Regate holds the call, or answers 202, until an approver decides.
default approval := {"required": false, "reason": ""}

approval := data.regate.tools.payments.approval if input.tool.name == "payments"
