"""The load harness: ``loadgen``, ``bench`` and the LocalStack launcher they share with the tests.

A satellite of the service: it imports the core (settings, runner, stages) and observes a run
only through what ``/metrics`` exposes (``Runtime.stats``); nothing in the core imports it.
"""
