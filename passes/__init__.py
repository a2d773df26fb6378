"""FX graph passes of xq-compile (installed as ``xq_compile.passes``).

``match`` finds each layer's K/V projection and cache append; ``rewrite`` turns them into an X-cache
store plus a K/V rebuild; ``emit`` records reference torch code into a graph.
"""

from .match import APPEND_FORMS, AppendForm, Site, SiteReport, find_sites
from .rewrite import GraphInput, RewriteResult, XQuantRewrite

__all__ = ["APPEND_FORMS", "AppendForm", "GraphInput", "RewriteResult", "Site", "SiteReport", "XQuantRewrite", "find_sites"]
