"""The SSRF guard: which URLs and addresses the service may download from (no network used)."""

from __future__ import annotations

import ipaddress

import pytest

from storage import RefusedURL, UrlPolicy, is_public_address

NOT_PUBLIC = [
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "127.0.0.1",
    "127.1.2.3",
    "100.64.0.1",  # carrier-grade NAT
    "169.254.169.254",  # cloud metadata
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3f57:fef5",  # Teredo: public server, client 192.168.1.10
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "fd00:ec2::254",  # AWS metadata over IPv6
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: public server, client 8.8.8.8
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_and_special_addresses_are_not_public(address: str) -> None:
    """Private, loopback, link-local, metadata and wrapped private addresses are not public."""
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_public(address: str) -> None:
    """Globally routable addresses, bare or wrapped in an IPv6 form, are public."""
    assert is_public_address(ipaddress.ip_address(address))


def test_teredo_sample_wraps_the_client_it_claims() -> None:
    """The Teredo samples above carry the private and public clients their comments name."""
    private = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3f57:fef5")
    public = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:f7f7:f7f7")
    assert private.teredo == (
        ipaddress.IPv4Address("65.54.227.120"),
        ipaddress.IPv4Address("192.168.1.10"),
    )
    assert public.teredo is not None
    assert public.teredo[1] == ipaddress.IPv4Address("8.8.8.8")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://cdn.example.com/v.mp4", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://cdn.example.com/", "only http and https"),
        ("javascript:alert(1)", "only http and https"),
        ("cdn.example.com/v.mp4", "only http and https"),
        ("http://user:secret@cdn.example.com/v.mp4", "credentials"),
        ("http://user@cdn.example.com/v.mp4", "credentials"),
        ("http://evil.example\\@cdn.example.com/", "credentials"),
        ("http://cdn.example.com:0/v.mp4", "port 0"),
        ("http://cdn.example.com:99999/v.mp4", "malformed"),
        ("http://cdn.example.com:http/v.mp4", "malformed"),
        ("http://[::1/v.mp4", "malformed"),
        ("http:///v.mp4", "no host"),
        ("https://", "no host"),
    ],
)
def test_bad_url_forms_are_refused_with_a_reason(url: str, reason: str) -> None:
    """Non-http schemes, credentials, port 0, malformed or hostless URLs are refused, saying why."""
    with pytest.raises(RefusedURL) as caught:
        UrlPolicy(allow_private=True).check_form(url)
    assert reason in caught.value.reason
    assert caught.value.url == url
    assert caught.value.retry is False


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.klingai.com/v.mp4",
        "https://klingai.com/v.mp4",
        "https://CDN.KlingAI.com./v.mp4",
        "http://a.b.kwimgs.com:8443/v.mp4",
    ],
)
def test_hosts_under_an_allowed_suffix_pass(url: str) -> None:
    """A host equal to or under an allowed suffix passes, whatever its case or trailing dot."""
    policy = UrlPolicy(allowed_hosts=("klingai.com", "kwimgs.com"))
    assert policy.check_form(url).geturl() == url


@pytest.mark.parametrize(
    "url",
    [
        "https://evilklingai.com/v.mp4",
        "https://klingai.com.evil.example/v.mp4",
        "https://cdn.example.com/klingai.com/v.mp4",
        "https://127.0.0.1/v.mp4",
    ],
)
def test_hosts_outside_the_allowed_suffixes_are_refused(url: str) -> None:
    """A host that only looks like an allowed one is refused, naming DOWNLOAD_ALLOWED_HOSTS."""
    policy = UrlPolicy(allow_private=True, allowed_hosts=("klingai.com",))
    with pytest.raises(RefusedURL, match="not in DOWNLOAD_ALLOWED_HOSTS"):
        policy.check_form(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v.mp4",
        "http://10.1.2.3/v.mp4",
        "http://192.168.0.10/v.mp4",
        "http://[::1]:8000/v.mp4",
        "http://[::ffff:127.0.0.1]/v.mp4",
        "http://[64:ff9b::a00:1]/v.mp4",
        "http://localhost:8000/v.mp4",  # resolved from /etc/hosts
        "http://2130706433/v.mp4",  # 127.0.0.1 in decimal
        "http://0x7f.1/v.mp4",  # 127.0.0.1 in hex shorthand
    ],
)
def test_private_hosts_are_refused_by_default(url: str) -> None:
    """A host that is or resolves to a non-public address is refused, for good."""
    with pytest.raises(RefusedURL) as caught:
        UrlPolicy().resolve(url)
    assert "not a public address" in caught.value.reason
    assert "ALLOW_PRIVATE_DOWNLOADS" in caught.value.reason
    assert caught.value.retry is False


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",  # ECS task credentials
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud
        "http://[fe80::1]/v.mp4",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[2002:a9fe:a9fe::]/latest/meta-data/",
    ],
)
def test_metadata_and_link_local_are_refused_even_when_private_is_allowed(url: str) -> None:
    """ALLOW_PRIVATE_DOWNLOADS never opens link-local or cloud metadata addresses."""
    with pytest.raises(RefusedURL) as caught:
        UrlPolicy(allow_private=True).resolve(url)
    assert "link-local or cloud metadata" in caught.value.reason
    assert caught.value.retry is False


@pytest.mark.parametrize(
    ("url", "host", "port", "address"),
    [
        ("http://127.0.0.1:8000/v.mp4", "127.0.0.1", 8000, "127.0.0.1"),
        ("https://10.0.0.5/v.mp4", "10.0.0.5", 443, "10.0.0.5"),
        ("http://[::1]/v.mp4", "::1", 80, "::1"),
        ("http://100.101.102.103/v.mp4", "100.101.102.103", 80, "100.101.102.103"),
    ],
)
def test_private_hosts_pass_when_allowed(url: str, host: str, port: int, address: str) -> None:
    """With ALLOW_PRIVATE_DOWNLOADS, loopback, private and CGNAT hosts resolve to one target."""
    target = UrlPolicy(allow_private=True).resolve(url)
    assert (target.url, target.host, target.port, target.addresses) == (url, host, port, (address,))


def test_public_literal_resolves_without_lookup() -> None:
    """A public address literal passes the default policy and is the address connected to."""
    target = UrlPolicy().resolve("https://8.8.8.8/v.mp4")
    assert (target.scheme, target.port, target.addresses) == ("https", 443, ("8.8.8.8",))


def test_allowed_hosts_are_checked_before_resolving() -> None:
    """A host outside the allowed suffixes is refused by resolve too, before any lookup."""
    policy = UrlPolicy(allow_private=True, allowed_hosts=("klingai.com",))
    with pytest.raises(RefusedURL, match="not in DOWNLOAD_ALLOWED_HOSTS"):
        policy.resolve("http://localhost/v.mp4")


OWN = "http://127.0.0.1:8000/samples/"


@pytest.mark.parametrize("url", [OWN + "sample.mp4", OWN + "sample.png?x=1"])
def test_the_service_s_own_samples_pass_on_a_private_address(url: str) -> None:
    policy = UrlPolicy(allowed_hosts=("cdn.klingai.com",), own_samples=OWN)
    assert policy.resolve(url).addresses == ("127.0.0.1",)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/api/tasks",  # the same origin, not the samples
        "http://127.0.0.1:8001/samples/sample.mp4",  # another port
        "http://127.0.0.1:8000/samples/../api/tasks",
        "http://127.0.0.1:8000/samples/%2e%2e/api/tasks",
        "http://127.0.0.1:8000/samples/..\\api",
        "http://127.0.0.1:8000/samplesX/sample.mp4",
    ],
)
def test_nothing_else_of_the_service_s_address_passes(url: str) -> None:
    with pytest.raises(RefusedURL) as refused:
        UrlPolicy(own_samples=OWN).resolve(url)
    assert "not a public address" in refused.value.reason
