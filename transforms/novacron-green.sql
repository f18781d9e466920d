-- NovaCron's new (green) schema: tenants, compute_nodes instead of hypervisors, vms with enum
-- states and tenant ids. Keys stay blue's ids so every change can be matched.
CREATE TYPE node_status AS ENUM ('online', 'offline', 'maintenance', 'error');
CREATE TYPE vm_state AS ENUM ('creating', 'running', 'stopped', 'paused', 'migrating', 'error', 'deleting');
CREATE TABLE tenants (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    slug       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenants (id, name, slug) VALUES
    ('00000000-0000-0000-0000-000000000001', 'Default Tenant', 'default'),
    ('00000000-0000-0000-0000-000000000002', 'Acme', 'acme.example'),
    ('00000000-0000-0000-0000-000000000003', 'Globex', 'globex.example');
CREATE TABLE users (
    id         bigint PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text,
    tenant_id  uuid NOT NULL REFERENCES tenants (id),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE compute_nodes (
    id              bigint PRIMARY KEY,
    name            text NOT NULL,
    hostname        text NOT NULL UNIQUE,
    status          node_status NOT NULL DEFAULT 'offline',
    cpu_cores       integer,
    memory_total    bigint,
    hypervisor_type varchar(50),
    tags            jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE TABLE vms (
    id           bigint PRIMARY KEY,
    name         text NOT NULL,
    state        vm_state NOT NULL,
    cpu_cores    integer,
    memory_mb    integer,
    disk_size_gb integer,
    node_id      bigint REFERENCES compute_nodes (id),
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    owner_id     bigint REFERENCES users (id),
    ip_address   inet,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX vms_tenant_state ON vms (tenant_id, state);
CREATE TABLE api_keys (
    id         bigint PRIMARY KEY,
    user_id    bigint REFERENCES users (id),
    key_hash   text NOT NULL,
    created_at timestamptz NOT NULL
);
