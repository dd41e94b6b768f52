"""PII tooling around the masked columns: audited recovery (``unmask``) and ``rekey``.

A satellite of the service: it depends on the core (settings, clients, the key ring in
``pipeline.keyring``, ``stages.masking``), and nothing in the core depends on it. The key ring
itself stays in the core because ``run`` needs it to mask.
"""
