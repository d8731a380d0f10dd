"""Check a Ray cluster launcher config before `ray up` starts (and bills) anything, and write the
versions its nodes install.

    python -m common.cluster_check cluster.yaml [OTHER.yaml ...]
        `cluster.yaml: ok` (exit 0), or one line per problem (exit 2): a `SET-...` placeholder
        left in it (your address, an image digest, a host, an SSH user or key), an image not
        pinned by digest (an AWS node's AMI by ID), a `pip install` without the constraints, a
        mounted folder that would carry its .git or runs/ to the nodes, anything Ray's own
        validation refuses; on AWS also ingress open to the whole internet (or Ray's default
        group, which opens SSH to it), a node without IMDSv2, or a volume not encrypted; on
        your own machines (`local`) a machine listed twice. It reads the file, nothing else:
        no network, no cloud.
    python -m common.cluster_check --freeze > constraints.txt
        The version this environment runs of every package `pip install -e .` pulls in: what
        the nodes' `pip install -c constraints.txt` gets, so they run what the tests ran.

Provider-specific rules go by `provider.type` (`aws`; `local`: each machine listed once); the
others hold for any provider, an on-premise `local` one included.
"""
from __future__ import annotations

import contextlib
import copy
import io
import ipaddress
import logging
import platform
import re
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT = "ray-apex-dqn"
INSTALLERS = {"pip", "setuptools", "wheel"}  # the tools that install, not what runs
PLACEHOLDER = re.compile(r"\bSET-[A-Z0-9]+(?:-[A-Z0-9]+)*")
PLACEHOLDER_FIXES = {  # by how the placeholder ends; {image} is what precedes an `@`
    "-IP": "set it to your public address/32 (curl https://checkip.amazonaws.com)",
    "-DIGEST": "set it to the digest of {image} (docker buildx imagetools inspect {image}: its "
               "Digest: line)",
    "-HOST": "set it to the node's address",
    "-USER": "set it to the user SSH logs in as on every node",
    "-KEY": "set it to the path of the SSH private key every node accepts for that user",
}
DIGEST_PINNED = re.compile(r"@sha256:[0-9a-f]{64}")
AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")
PIP_INSTALL = re.compile(r"\bpip3?\s+install\b")
CONSTRAINED = re.compile(r"(?:^|\s)(?:-c|--constraint)(?:\s+|=)\S|\bPIP_CONSTRAINT=\S"
                         r"|(?:^|\s)(?:-r|--requirement)(?:\s+|=)\S*lock")
SETUP_COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands",
                  "worker_setup_commands")
# What a mounted checkout must leave behind, and why.
KEPT_OFF_THE_NODES = {".git": "its git history", "runs": "its run folders"}
PORT_NAMES = {22: "SSH", 6379: "Ray's GCS", 8265: "the dashboard", 10001: "Ray client",
              8080: "metrics"}


def mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def sequence(value: Any) -> list:
    return value if isinstance(value, list) else []


def strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, value) of every string in the config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, f"{where}[{index}]")
    elif isinstance(node, str):
        yield where, node


def placeholder_problems(config: dict) -> list[str]:
    problems = []
    for where, value in strings(config):
        for token in PLACEHOLDER.findall(value):
            fix = next((fix for end, fix in PLACEHOLDER_FIXES.items() if token.endswith(end)),
                       "replace it with the real value")
            fix = fix.format(image=value.split("@")[0])
            problems.append(f"{where} = {value} still holds the placeholder {token}: {fix}")
    return problems


def ray_problems(config: dict) -> list[str]:
    """What Ray's own offline validation (`ray up`'s first step) refuses, in one line."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    said = io.StringIO()
    logging.disable(logging.INFO)  # its notes on filling in defaults
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # jsonschema's, ValueError, an abort: each is Ray refusing
        lines = [line.strip() for line in [*str(error).splitlines(), *said.getvalue().splitlines()]
                 if line.strip() and "Exiting due to" not in line]
        return [f"Ray refuses it: {lines[0] if lines else type(error).__name__}"]
    finally:
        logging.disable(logging.NOTSET)
    return []


def node_configs(config: dict) -> Iterator[tuple[str, dict]]:
    for name, node_type in mapping(config.get("available_node_types")).items():
        yield f"available_node_types.{name}.node_config", mapping(
            mapping(node_type).get("node_config"))


def image_problems(config: dict) -> list[str]:
    """Every container image by digest: a tag can be pushed again."""
    images = [(f"docker.{key}", value) for key, value in mapping(config.get("docker")).items()
              if key.endswith("image")]
    for name, node_type in mapping(config.get("available_node_types")).items():
        images += [(f"available_node_types.{name}.docker.{key}", value)
                   for key, value in mapping(mapping(node_type).get("docker")).items()
                   if key.endswith("image")]
    return [f"{where} = {image} is not pinned by digest (a tag can be pushed again): append "
            f"@sha256:<digest> (docker buildx imagetools inspect {image})"
            for where, image in images
            if isinstance(image, str) and not PLACEHOLDER.search(image)
            and not DIGEST_PINNED.search(image)]


def install_problems(config: dict) -> list[str]:
    """Every `pip install` takes the constraints: the nodes run what the tests ran."""
    commands = [(f"{key}[{index}]", command) for key in SETUP_COMMANDS
                for index, command in enumerate(sequence(config.get(key)))]
    for name, node_type in mapping(config.get("available_node_types")).items():
        commands += [(f"available_node_types.{name}.{key}[{index}]", command)
                     for key in SETUP_COMMANDS
                     for index, command in enumerate(sequence(mapping(node_type).get(key)))]
    return [f"{where} = `{command}` installs without the constraints: add -c "
            f"<the checkout on the node>/constraints.txt, so every node gets the versions the "
            f"tests ran" for where, command in commands
            if isinstance(command, str) and PIP_INSTALL.search(command)
            and not CONSTRAINED.search(command)]


def excluded_name(pattern: str) -> str:
    """The folder name an rsync exclude pattern keeps out wherever it is (`.git`, `**/.git`,
    `runs/`, `runs/**`), or the pattern itself."""
    for prefix in ("**/", "/"):
        pattern = pattern.removeprefix(prefix)
    for suffix in ("/***", "/**", "/"):
        pattern = pattern.removesuffix(suffix)
    return pattern


def mount_problems(config: dict, folder: Path) -> list[str]:
    """A mounted folder (paths as `ray up` run from `folder` reads them) leaves .git and runs/
    behind."""
    mounted = [local for local in mapping(config.get("file_mounts")).values()
               if isinstance(local, str) and (folder / Path(local).expanduser()).is_dir()]
    if not mounted:
        return []
    excluded = {excluded_name(pattern) for pattern in sequence(config.get("rsync_exclude"))
                if isinstance(pattern, str)}
    return [f"rsync_exclude does not keep {name} ({why}) out of the mounted {mounted[0]}: add "
            f'"{name}"' for name, why in KEPT_OFF_THE_NODES.items() if name not in excluded]


def ports(rule: dict) -> str:
    low, high = rule.get("FromPort"), rule.get("ToPort", rule.get("FromPort"))
    if str(rule.get("IpProtocol")) == "-1" or low in (None, -1):
        return "every port"
    if low == high:
        return f"port {low}" + (f" ({PORT_NAMES[low]})" if low in PORT_NAMES else "")
    return f"ports {low}-{high}"


def aws_ingress_problems(config: dict) -> list[str]:
    """Ray's default security group opens SSH to 0.0.0.0/0; every range here must be narrower
    than the whole internet."""
    rules = sequence(mapping(mapping(config.get("provider")).get("security_group"))
                     .get("IpPermissions"))
    if not rules:
        return ["provider.security_group.IpPermissions is not set: Ray's default group opens "
                "SSH (22) to 0.0.0.0/0; allow your address/32 only"]
    problems = []
    for rule_index, rule in enumerate(map(mapping, rules)):
        for ranges, field in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
            for index, entry in enumerate(sequence(rule.get(ranges))):
                where = (f"provider.security_group.IpPermissions[{rule_index}].{ranges}[{index}]"
                         f".{field}")
                cidr = mapping(entry).get(field)
                if isinstance(cidr, str) and PLACEHOLDER.search(cidr):
                    continue  # said as a placeholder
                try:
                    network = ipaddress.ip_network(str(cidr), strict=False)
                except ValueError:
                    problems.append(f"{where} = {cidr} is not an address range")
                    continue
                if network.prefixlen == 0:
                    problems.append(f"{where} = {cidr} opens {ports(rule)} to the whole "
                                    f"internet: allow your address/32 only")
    return problems


def aws_node_problems(config: dict) -> list[str]:
    """Each node: its AMI by ID, IMDSv2 only, every EBS volume encrypted."""
    region = mapping(config.get("provider")).get("region", "the region")
    problems = []
    for where, node_config in node_configs(config):
        image = node_config.get("ImageId")
        if not (isinstance(image, str) and (AMI_ID.fullmatch(image) or PLACEHOLDER.search(image))):
            problems.append(f"{where}.ImageId is not an AMI ID (Ray would pick its version's "
                            f"default): pin the AMI's ID in {region}")
        metadata_options = mapping(node_config.get("MetadataOptions"))
        if (metadata_options.get("HttpTokens") != "required"
                and metadata_options.get("HttpEndpoint") != "disabled"):
            problems.append(f"{where}.MetadataOptions.HttpTokens is not required: IMDSv1 hands "
                            f"the instance role's credentials to any GET (a forged request); "
                            f"set MetadataOptions: {{HttpTokens: required, HttpEndpoint: "
                            f"enabled, HttpPutResponseHopLimit: 1}}")
        mappings = sequence(node_config.get("BlockDeviceMappings"))
        if not mappings:
            problems.append(f"{where}.BlockDeviceMappings is not set: the root volume would "
                            f"be the AMI's default, unencrypted; map it with Ebs: "
                            f"{{Encrypted: true}}")
        for index, device in enumerate(map(mapping, mappings)):
            ebs = device.get("Ebs")
            if ebs is not None and mapping(ebs).get("Encrypted") is not True:
                problems.append(f"{where}.BlockDeviceMappings[{index}].Ebs.Encrypted is not "
                                f"true: the volume would be unencrypted")
    return problems


def local_address_problems(config: dict) -> list[str]:
    """Each machine listed once: Ray's local provider keeps its nodes by address, and `ray up`
    stops on a bare AssertionError when one repeats (or the head is also a worker)."""
    provider = mapping(config.get("provider"))
    addresses = [("provider.head_ip", provider.get("head_ip"))] + [
        (f"provider.worker_ips[{index}]", address)
        for index, address in enumerate(sequence(provider.get("worker_ips")))]
    first: dict[str, str] = {}
    problems = []
    for where, address in addresses:
        if not isinstance(address, str) or PLACEHOLDER.search(address):
            continue
        if address in first:
            problems.append(f"{where} = {address} is listed already as {first[address]}: each "
                            f"machine once (Ray's local provider keeps its nodes by address)")
        first.setdefault(address, where)
    return problems


PROVIDER_PROBLEMS: dict[str, tuple[Callable[[dict], list[str]], ...]] = {
    "aws": (aws_ingress_problems, aws_node_problems), "local": (local_address_problems,)}


def config_problems(config: dict, folder: Path) -> list[str]:
    """Every problem of a loaded config; `folder` is where `ray up` runs (its relative mounts)."""
    refused = ray_problems(config)
    if refused:  # the shapes the rules below read are not there: say what Ray says
        return refused + placeholder_problems(config)
    problems = [*placeholder_problems(config), *image_problems(config),
                *install_problems(config), *mount_problems(config, folder)]
    provider = str(mapping(config.get("provider")).get("type"))
    for provider_rule in PROVIDER_PROBLEMS.get(provider, ()):
        problems += provider_rule(config)
    return problems


def file_problems(path: Path) -> list[str]:
    import yaml
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as error:
        return [f"cannot read it: {error.strerror or error}"]
    except yaml.YAMLError as error:
        return [f"is not YAML: {' '.join(str(error).split())}"]
    if not isinstance(config, dict):
        return ["is not a mapping of Ray's cluster keys"]
    return config_problems(config, path.resolve().parent)


def installed_closure(root: str = PROJECT) -> dict[str, str]:
    """Name -> installed version of every package installing `root` pulls in (its extras
    followed, markers as this machine evaluates them), `root` and the installers left out."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    extras_of: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, set())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in extras_of and extras <= extras_of[key]:
            continue
        extras_of[key] = extras_of.get(key, set()) | extras
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: pip install -e . first") from None
        versions[key] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(
                    requirement.marker.evaluate({"extra": extra})
                    for extra in {"", *extras_of[key]}):
                todo.append((requirement.name, set(requirement.extras)))
    return {name: version for name, version in sorted(versions.items())
            if name != canonicalize_name(root) and name not in INSTALLERS}


def constraints_text() -> str:
    header = (
        "# The version of every package `pip install -e .` pulls in, as the tests ran them\n"
        f"# (Python {sys.version_info.major}.{sys.version_info.minor}, {sys.platform} "
        f"{platform.machine()}): what "
        "cluster.yaml's nodes install\n"
        "# (pip install -c constraints.txt -e .). After changing a dependency or its version:\n"
        "#     python -m common.cluster_check --freeze > constraints.txt\n")
    return header + "".join(f"{name}=={version}\n"
                            for name, version in installed_closure().items())


def main(argv: list[str]) -> int:
    if argv == ["--freeze"]:
        sys.stdout.write(constraints_text())
        return 0
    if not argv or any(arg.startswith("-") for arg in argv):
        print("usage: python -m common.cluster_check CLUSTER.yaml [...] | --freeze",
              file=sys.stderr)
        return 2
    failed = False
    for arg in argv:
        problems = file_problems(Path(arg))
        for problem in problems:
            print(f"{arg}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{arg}: ok")
        failed = failed or bool(problems)
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
