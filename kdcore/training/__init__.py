"""Training: the step and the loop, the per-sample losses, the curriculum sampler, evaluation, checkpoints.

It trains one student on packed samples, from a teacher model or a teacher cache it is handed; where
the teacher comes from is :mod:`kdcore.teachers`' concern, and what a run writes is :mod:`kdcore.runs`'.
"""
