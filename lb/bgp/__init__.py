"""lb announces its VIPs by BGP through BIRD 2 (docs/bgp.md).

``fragment`` writes the one BIRD config file lb owns, ``bird`` speaks BIRD's
control socket, ``speaker`` decides what is announced and when. Nothing here
touches the data plane: the daemon tells the speaker what it serves.
"""
