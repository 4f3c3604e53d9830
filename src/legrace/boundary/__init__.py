"""The trust boundary. `messages` lists every message and field that may cross between the trusted
side and the accelerator, and their wire format: read it to audit the privacy claim. `gateway` is
the trusted side's only door (it sends those messages and checks every answer), `transport` carries
frames between processes (authenticated), `audit` logs every crossing."""
