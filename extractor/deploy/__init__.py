"""The deployment: what runs on a laptop or a CI machine before a cluster exists, for
``create_cluster.sh`` (``python -m extractor.deploy.<module>``), never on the cluster.

- ``plan``: the script's settings checked and completed before anything is uploaded or created;
- ``instances``: instance types, the executor layout that fills the nodes, cost per million images;
- ``emr``: the cluster's JSON documents (instance groups, configurations, bootstrap, steps);
- ``iam``: the least-privilege policy of the cluster's instance profile;
- ``packed_env``: one archive of every cluster pin (no PyPI at cluster start).

Import rule (``extractor.MAY_IMPORT``): these modules may import the shared basics, the
storage layer and the executor's constants (``layout``, ``s3``, ``inventory``, ``gpu``, ``rates``,
``errors``); nothing shipped imports them (tested), so the zip sent to the cluster
(``extractor.driver.package``) leaves this folder out.
"""
