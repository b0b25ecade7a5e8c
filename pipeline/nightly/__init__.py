"""The nightly job: plan, score, error budget, lease, commit, drift."""
