"""Hand-written policies: the field's heuristics (``heuristics``) and the RETAIN wrapper around any
of them (``retention``). numpy only, so a serving install can import them; import the modules
themselves, this package re-exports nothing."""
