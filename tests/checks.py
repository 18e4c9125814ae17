"""Checks shared by the tests of model and guide."""

from pyro import poutine
from pyro.util import check_model_guide_match, check_site_shape


def checked_traces(model, guide, *args):
    """Trace ``guide``, replay ``model`` on it, and check that their sample sites match and
    that every site's shape fits one plate; returns ``(model_trace, guide_trace)`` with
    their log-probabilities computed."""
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting=1)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample":
                check_site_shape(site, max_plate_nesting=1)
    return model_trace, guide_trace
