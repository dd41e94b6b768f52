"""The table over years: monthly partitions, retention, per-user erasure, online conversion.

``partitions`` decides the layout (``schema.plan`` asks it what is pending), ``maintenance`` keeps
months created ahead and applies retention from inside ``run``, and ``retention``, ``erase`` and
``convert`` are the operator's commands.
"""
