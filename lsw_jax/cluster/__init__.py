"""Multi-replica studies outside the server: dLoRA's request-adapter co-migration solver
(``placement``) and a discrete-event cluster simulator that measures it (``simulator``)."""
