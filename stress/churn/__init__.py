"""The churn stress harness (run it as ``python stress/churn.py``; see that file's docstring).

One module per concern: ``schedule`` (the seeded fault schedule, sans-I/O), ``tracker``
(what the run saw and the recovery rules, sans-I/O), ``report`` (text, JSON, PNG),
``peer`` (a trainer's loop), ``procs`` (the processes and the faults done to them),
``orchestrator`` (the run), ``cli`` (the options).
"""
