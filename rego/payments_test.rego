# Tests of the payments rules (rego/tools/payments.rego): currency, amount per
# call, and the running total Regate keeps through decision.limits.
package regate_test

pay_in(agent, amount, currency) := call(agent, "payments", "POST", "/tools/payments/pay", {"amount": amount, "currency": currency, "to": "ACME"})

test_payment_without_currency_is_in_the_tools_currency if {
	d := decide(pay("analyst-2", 40))
	d.allow
	d.cost == 40
}

test_payment_in_a_listed_currency if {
	decide(pay_in("analyst-2", 40, "USD")).allow
}

test_payment_in_an_unlisted_currency_is_refused if {
	denied_with(pay_in("analyst-2", 99, "BTC"), "A payment in the currency 'BTC' was refused: agent 'analyst-2' may pay only in USD")
	denied_with(pay_in("analyst-2", 99, "usd"), "the currency 'usd'")
	denied_with(pay_in("analyst-2", 99, null), "the currency 'null'")
	denied_with(pay_in("analyst-2", 99, ["USD"]), "was refused: agent 'analyst-2' may pay only in USD")
}

test_currencies_come_from_the_grant_then_the_tool if {
	eur := {"methods": ["POST"], "currencies": ["USD", "EUR"], "approval_above": 100}
	decide(pay_in("analyst-2", 40, "EUR")).allow with data.agents["analyst-2"].tools.payments as eur
	denied_with(pay_in("analyst-2", 40, "GBP"), "may pay only in USD, EUR") with data.agents["analyst-2"].tools.payments as eur
	plain := {"methods": ["POST"]}
	denied_with(pay_in("analyst-2", 40, "EUR"), "may pay only in USD") with data.agents["analyst-2"].tools.payments as plain
	eur_tool := json.patch(data.tools.payments, [{"op": "replace", "path": "/currencies", "value": ["EUR"]}])
	decide(pay_in("analyst-2", 40, "EUR")).allow with data.agents["analyst-2"].tools.payments as plain with data.tools.payments as eur_tool
}

test_a_payment_without_a_human_counts_against_the_window if {
	d := decide(pay("analyst-2", 100))
	d.allow
	d.approval.required == false
	d.cost == 100
	d.limits == {"budget": {"units": 1000, "window": "1h"}}
}

test_a_payment_a_human_approves_does_not_count_against_the_window if {
	d := decide(pay("analyst-2", 250))
	d.approval.required
	d.cost == 250
	d.limits == null
}

test_a_refused_payment_costs_the_tools_cost_and_sets_no_limits if {
	d := decide(pay("analyst-2", -5))
	not d.allow
	d.cost == 5
	d.limits == null
}

test_the_window_comes_from_the_grant_then_the_tool if {
	d := decide(pay("analyst-2", 10)) with data.agents["analyst-2"].tools.payments as {"methods": ["POST"]}
	d.limits == null
	tool := object.union(data.tools.payments, {"spend": {"units": 50, "window": "1d"}})
	d2 := decide(pay("analyst-2", 10)) with data.agents["analyst-2"].tools.payments as {"methods": ["POST"]} with data.tools.payments as tool
	d2.limits == {"budget": {"units": 50, "window": "1d"}}
}
