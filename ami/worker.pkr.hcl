# Packer template for the imgclass app-tier worker AMI. Run it through ami/bake.sh,
# which builds the source tarball and passes it in as `source_tarball`:
#
#   ami/bake.sh --region "$AWS_REGION"   # the controller's region: an AMI is regional
#
# It starts a temporary build instance from the newest Amazon Linux 2023 image,
# uploads the tarball, runs ami/provision.sh as root, and snapshots the result.

packer {
  required_plugins {
    amazon = {
      # Not any later major version: the bake policy (iam-bake-policy.json) allows the
      # calls this line of the plugin makes, and a new call fails a bake midway.
      version = "~> 1.3"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "source_tarball" {
  type        = string
  description = "The repository as a .tar.gz (made by ami/bake.sh)."
}

variable "weights_source" {
  type        = string
  default     = "imagenet"
  description = "imagenet | s3://bucket/key | none; ignored when the tarball holds the weights file."
}

variable "weights_in_tarball" {
  type        = bool
  default     = false
  description = "Whether the source tarball holds the weights file (bake.sh --weights)."
}

variable "build_instance_type" {
  # More memory and CPU than a worker needs, so pip and the warm-up run quickly.
  type    = string
  default = "t3.large"
}

variable "build_instance_profile" {
  type        = string
  default     = ""
  description = "Instance profile for the build instance; needed only for weights_source = s3://..."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet with internet access for the build instance (default: the default VPC)."
}

variable "kernel_line" {
  # AL2023 ships several kernel lines, and from June 2026 moves its default kernel each
  # year: the newest AMI of any line could change the kernel between two bakes, untried
  # on the workers' t2 (Xen) instances. A new line is a choice, made here.
  type    = string
  default = "6.1"
}

variable "ami_name_prefix" {
  type    = string
  default = "imgclass-worker"
}

variable "manifest_path" {
  type    = string
  default = "packer-manifest.json"
}

locals {
  stamp = formatdate("YYYYMMDD-hhmmss", timestamp())
  # What the image's tag imgclass:weights says: an image baked without the weights
  # works only with MODEL_WEIGHTS=s3://... or random, and looked like any other.
  weights = var.weights_in_tarball || var.weights_source != "none" ? "imagenet" : "none"
  description = (local.weights == "none"
    ? "imgclass app-tier worker: Python 3.11, TensorFlow, ResNet-50 without weights (MODEL_WEIGHTS=s3://... or random)"
  : "imgclass app-tier worker: Python 3.11, TensorFlow, ResNet-50 ImageNet weights")
}

source "amazon-ebs" "worker" {
  region               = var.region
  instance_type        = var.build_instance_type
  iam_instance_profile = var.build_instance_profile
  subnet_id            = var.subnet_id
  ami_name             = "${var.ami_name_prefix}-${local.stamp}"
  ami_description      = local.description

  source_ami_filter {
    filters = {
      name                = "al2023-ami-2023.*-kernel-${var.kernel_line}-x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
    most_recent = true
  }
  ssh_username = "ec2-user"
  # The build's temporary security group lets SSH in from this machine's public address
  # (as https://checkip.amazonaws.com sees it) only, not from 0.0.0.0/0, its default.
  temporary_security_group_source_public_ip = true
  # The build's temporary key is not left in the image's authorized_keys.
  ssh_clear_authorized_keys = true
  # How long Packer waits for the image (and the build instance) to be ready: up to 40
  # minutes, where its default gives up sooner on a slow day, and deletes the image.
  aws_polling {
    delay_seconds = 30
    max_attempts  = 80
  }

  # IMDSv2 only, for the build instance and, through imds_support, for every
  # instance launched from the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 16
    volume_type           = "gp3"
    delete_on_termination = true
  }

  tags = {
    Name            = "${var.ami_name_prefix}-${local.stamp}"
    "imgclass:role" = "app-tier-ami"
    SourceAMI       = "{{ .SourceAMI }}"
    # imagenet (checked against Keras's MD5 by provision.sh) or none.
    "imgclass:weights" = local.weights
  }
  run_tags = {
    Name = "imgclass-ami-builder"
  }
}

build {
  sources = ["source.amazon-ebs.worker"]

  provisioner "file" {
    source      = var.source_tarball
    destination = "/tmp/imgclass-src.tar.gz"
  }

  provisioner "shell" {
    script          = "${path.root}/provision.sh"
    # {{ .Vars }} carries environment_vars through sudo.
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    environment_vars = [
      "SRC_TARBALL=/tmp/imgclass-src.tar.gz",
      "WEIGHTS_SOURCE=${var.weights_source}",
      "AWS_DEFAULT_REGION=${var.region}",
    ]
  }

  post-processor "manifest" {
    output     = var.manifest_path
    strip_path = true
  }
}
