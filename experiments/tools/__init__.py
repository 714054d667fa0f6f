"""The project's own tools, none of them on a run's path: the offline bundle for a GPU node
(:mod:`.wheelhouse`), the one-slot GPU benchmark orchestrator (:mod:`.gpu_quick`), the cost-doc generator
(:mod:`.cost_table`), the import graph of the packages (:mod:`.import_graph`) and the one-node SLURM
cluster of CI (``slurm_cluster.sh``)."""
