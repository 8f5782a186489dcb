"""Teachers: which teacher a run distils from (decided in one place), training a from-scratch one, and the
top-K teacher cache that stands in for a teacher model.
"""
