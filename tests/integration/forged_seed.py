"""A forged seed for tests/integration/test_discovery.py, run inside a lab host that is
not a member: it advertises ``_meshd._udp`` claiming another network's id and CA
fingerprint (anyone on the LAN hears both in real adverts) and answers enrolment
like a seed that admits everyone, presenting a certificate of its own CA. It knows
the network's gossip key and CA public key (an old member's knowledge; read from
TOKEN_FILE, of which it uses nothing else), so the encrypted enrolment handshake
gets as far as the seed's proof of membership.

    python forged_seed.py ADDRESS NETWORK_ID CA_FINGERPRINT TOKEN_FILE

Prints ``ready`` once advertised, then one ``enrolment request from NAME`` line per
request it received (what it learnt: the joiner's public certificate, nothing else).

    python forged_seed.py --member ADDRESS NETWORK_ID CA_FINGERPRINT KEY CLAIMED

publishes, with zeroconf itself, an advert for a real member's WireGuard KEY that
puts it at CLAIMED (an address of that member's record that is no use from this
LAN); its instance name sorts before the member's own. Prints ``ready``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time
from pathlib import Path

from meshd.identity import WireGuardKeyPair, decode_key
from meshd.mdns import Advert, LanService
from meshd.pki.ca import NetworkCA
from meshd.pki.certificate import CertChain
from meshd.pki.enrol import EnrolRequest, EnrolResult, PeerInfo, SeedIdentity
from meshd.pki.enrol_server import EnrolServer
from meshd.pki.token import parse_token

WIREGUARD_PORT, ENROL_PORT = 51820, 51821


async def main(address: str, network_id: str, ca_fp: str, token_text: str) -> None:
    token = parse_token(token_text, int(time.time()))
    keys = WireGuardKeyPair.generate()
    own_ca = NetworkCA.generate("lab")  # the victim network's name, another CA
    mesh = ipaddress.ip_address("100.80.250.250")
    chain = CertChain(own_ca.issue_node_cert("forged", keys.public_key, (mesh,)))

    def accept_anyone(request: EnrolRequest) -> None:
        print(f"enrolment request from {request.name}", flush=True)

    def welcome(request: EnrolRequest) -> EnrolResult:
        return EnrolResult(seed=PeerInfo(chain, f"{address}:{WIREGUARD_PORT}"))

    identity = SeedIdentity(
        private_key=decode_key(keys.private_key),
        chain=chain,
        gossip_keys=(token.gossip_key,),
        ca_public_key=token.ca_public_key,
    )
    server = EnrolServer("0.0.0.0", ENROL_PORT, accept_anyone, welcome, identity=lambda: identity)
    await server.start()
    lan = LanService([ipaddress.ip_address(address)])
    await lan.start()
    await lan.advertise(
        Advert(
            name="forged",
            network_id=network_id,
            ca_fingerprint=ca_fp,
            public_key=keys.public_key,
            addresses=(ipaddress.ip_address(address),),
            port=WIREGUARD_PORT,
            enrol_port=ENROL_PORT,
        )
    )
    print("ready", flush=True)
    await asyncio.Event().wait()


async def forge_member(address: str, network_id: str, ca_fp: str, key: str, claimed: str) -> None:
    import socket

    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from meshd.mdns import SERVICE_TYPE, encode_txt

    advert = Advert("a", network_id, ca_fp, key, (ipaddress.ip_address(claimed),), 51820)
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"a-forged.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(claimed)],
        port=WIREGUARD_PORT,
        properties=encode_txt(advert),
        server="a-forged.local.",
    )
    zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    await (await zc.async_register_service(info))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1] == "--member":
        asyncio.run(forge_member(*sys.argv[2:7]))
    else:
        address, network_id, ca_fp, token_file = sys.argv[1:5]
        asyncio.run(main(address, network_id, ca_fp, Path(token_file).read_text().strip()))
