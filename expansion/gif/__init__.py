"""GIF (arXiv 2211.13976): one template (:mod:`.template`) and its priors (:mod:`.sd`, :mod:`.mae`,
:mod:`.unclip`, :mod:`.ae`), the guides (:mod:`.guides`) and DreamBooth for the medical sets."""
