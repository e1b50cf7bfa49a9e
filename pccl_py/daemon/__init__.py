"""The peer daemon: one process per trainer, owning every network connection of that peer.

Run it as ``python -m pccl_py.daemon`` or ``pccl daemon`` (a :class:`~pccl_py.client.Client`
spawns one by default). :mod:`~pccl_py.daemon.service` joins the control channel to the
coordinator, the data plane to the other daemons and the trainer sessions
(:mod:`~pccl_py.daemon.session`, one per connected trainer) together.
"""
