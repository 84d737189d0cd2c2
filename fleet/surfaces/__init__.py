"""What people and programs use: the clients, the HTTP gateway, the CLI, batch jobs.

Owns: the Python clients (``client``, ``aio``), the HTTP gateway and its run console
(``gateway/``, ``gateway/console/``), the ``fleet``
command (``cli``), batch jobs from JSONL files (``batch``), the views of runs, listings, agents and
tenants both print (``views``, ``timeline``) and the local stack behind ``fleet up``
(``stack``).

May import: every layer below it. Nothing imports it but the package's public API.
"""
