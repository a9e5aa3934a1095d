"""Quality assurance of results: the plausibility gate before delivery, and afterwards the
clinicians' approved structure sets, agreement with them and drift of a model version."""
