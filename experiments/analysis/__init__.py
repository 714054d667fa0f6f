"""What runs are read by after they end: the quality metrics of an expanded set (:mod:`.quality`, a
registry), paper-style tables (:mod:`.aggregate`), the sweep report (:mod:`.report`) and the
real-vs-synthetic exchange rate (:mod:`.equivalence`)."""
