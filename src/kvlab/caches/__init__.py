"""Cache policies: transformers caches that `model(...)` and `model.generate(...)` accept.

Importing this package registers the built-in policies; `RunSpec` looks them up by name.
"""

from kvlab.caches.registry import CachePolicy, make_policy, parse_policy, policy_class, policy_names, register

# Built-in policies register themselves on import.
from kvlab.caches import dynamic as _dynamic  # noqa: F401,E402
from kvlab.caches import flexgen as _flexgen, kvpr as _kvpr, offload as _offload  # noqa: F401,E402
from kvlab.caches import mixed as _mixed  # noqa: F401,E402
from kvlab.caches import fp8 as _fp8  # noqa: F401,E402
from kvlab.caches import eviction as _eviction  # noqa: F401,E402

__all__ = ["CachePolicy", "make_policy", "parse_policy", "policy_class", "policy_names", "register"]
