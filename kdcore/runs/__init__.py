"""One run, from a config to a run directory: orchestration, the dry run, what a run writes (metrics,
summary, plots, model card) and the experiment trackers.

Named ``runs`` rather than ``run`` because ``kdcore.run`` is the public function that starts one.
"""
