"""The embedded AWS: moto's server on loopback, and a runner that turns each
app-tier EC2 instance into a real local worker process."""
