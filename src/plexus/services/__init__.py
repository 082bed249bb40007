"""Services: validate a request against the model, allocate, and write desired state in one
transaction. They never touch the kernel: they wait until the reconcilers have applied their
transaction (``Context.settle``), and undo it if a reconciler failed on their objects.

    context.py     what every service shares (store, cache, progress, configuration)
    networks.py    networks: subnets chosen and claimed
    endpoints.py   attachments of a namespace to a network: addresses, ports
    ports.py       host-port claims as transaction plans
    pools.py       IPAM pools held before a network exists (Docker's IPAM driver)
"""
