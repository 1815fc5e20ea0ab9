# Argument rules of the `payments` tool: amounts above a threshold need a
# human approval; amounts above the agent's hard limit are refused.
#
# Thresholds: the grant's `approval_above` and `max_amount`
# (policies/agents.yaml), else the tool's `approval_above` (policies/tools.yaml).
#
# Rules of package regate are named by full path (data.regate.args): an
# `import data.regate` here would make regorus see a cycle between the
# two packages (OPA would not mind; the conformance tests record it).
package regate.tools.payments

amount := data.regate.args.amount

currency := object.get(data.regate.tool, "currency", "USD")

approval_above := object.get(data.regate.grant, "approval_above", object.get(data.regate.tool, "approval_above", 0))

valid_amount if {
	is_number(amount)
	amount > 0
}

deny contains "The payments tool needs a positive number argument 'amount'." if {
	not valid_amount
}

deny contains msg if {
	valid_amount
	amount > data.regate.grant.max_amount
	msg := sprintf(
		"A payment of %v %s is above the limit of %v %s for agent '%s' and was refused.",
		[amount, currency, data.regate.grant.max_amount, currency, input.agent.id],
	)
}

# Above the threshold the call is allowed only once a human approves it.
default approval := {"required": false, "reason": ""}

approval := {"required": true, "reason": msg} if {
	valid_amount
	amount > approval_above
	msg := sprintf(
		"A payment of %v %s is above the %v %s that agent '%s' may pay without a human approval.",
		[amount, currency, approval_above, currency, input.agent.id],
	)
}
