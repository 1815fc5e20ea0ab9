# Argument rules of the `payments` tool: which currencies, how much per call,
# and how much in total per window.
#
# - Currency: a payment names its `currency` (a missing one means the tool's
#   `currency`, policies/tools/data.yaml); it must be one the grant's `currencies`
#   lists (else the tool's `currencies`, else the tool's currency alone),
#   spelled exactly: 'usd' is not 'USD', and 99 BTC is refused outright.
# - Per call: above the grant's `approval_above` (else the tool's) a human
#   approves; above the grant's `max_amount` it is refused.
# - In total: the grant's `spend` ({units, window}, as a budget is spelled in
#   policies/limits/data.yaml) caps what the agent pays without a human per window.
#   The decision asks Regate for that budget (decision.limits.budget) and sets
#   the call's cost to its amount, so Regate keeps the running total, and the
#   payment that would take it past `units` is refused with 429. Payments a
#   human approves do not count against it (the human is the limit there).
#
# Limits are numbers in the payment's own currency, whichever it is: list
# several currencies in one grant only where that is what you mean. The
# policy never converts or rounds an amount: arithmetic on decimals differs
# between regorus (binary floats) and OPA (exact decimals), comparisons do not.
#
# Because a payment's cost is its amount, the agent's budget in
# policies/limits/data.yaml counts what it pays (approved payments too) beside the
# cost of its other calls.
#
# Rules of package regate are named by full path (data.regate.args): an
# `import data.regate` here would make regorus see a cycle between the
# two packages (OPA would not mind; the conformance tests record it).
package regate.tools.payments

amount := data.regate.args.amount

default_currency := object.get(data.regate.tool, "currency", "USD")

currency := c if {
	c := data.regate.args.currency
} else := default_currency

currencies := object.get(
	data.regate.grant, "currencies",
	object.get(data.regate.tool, "currencies", [default_currency]),
)

approval_above := object.get(data.regate.grant, "approval_above", object.get(data.regate.tool, "approval_above", 0))

valid_amount if {
	is_number(amount)
	amount > 0
}

deny contains "The payments tool needs a positive number argument 'amount'." if {
	not valid_amount
}

deny contains msg if {
	not currency in currencies
	msg := sprintf(
		"A payment in the currency '%v' was refused: agent '%s' may pay only in %s (a payment without 'currency' is in %s).",
		[currency, input.agent.id, concat(", ", currencies), default_currency],
	)
}

deny contains msg if {
	valid_amount
	amount > data.regate.grant.max_amount
	msg := sprintf(
		"A payment of %v %v is above the limit of %v %v for agent '%s' and was refused.",
		[amount, currency, data.regate.grant.max_amount, currency, input.agent.id],
	)
}

# Above the threshold the call is allowed only once a human approves it.
default approval := {"required": false, "reason": ""}

approval := {"required": true, "reason": msg} if {
	needs_human
	msg := sprintf(
		"A payment of %v %v is above the %v %v that agent '%s' may pay without a human approval.",
		[amount, currency, approval_above, currency, input.agent.id],
	)
}

needs_human if {
	valid_amount
	amount > approval_above
}

# A payment costs what it pays; an invalid one (refused anyway) the tool's cost.
cost := amount if {
	valid_amount
} else := object.get(data.regate.tool, "cost", null)

# The running total of what the agent pays without a human, per window.
limits := {"budget": spend} if {
	valid_amount
	not needs_human
	spend := object.get(data.regate.grant, "spend", object.get(data.regate.tool, "spend", null))
	spend != null
} else := null
