-- NovaCron's current (blue) schema: the tables the migration reshapes.
CREATE TABLE users (
    id         bigint PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE hypervisors (
    id         bigint PRIMARY KEY,
    hostname   text NOT NULL UNIQUE,
    status     text NOT NULL DEFAULT 'active',
    type       text,
    capacity   jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE virtual_machines (
    id             bigint PRIMARY KEY,
    name           text NOT NULL,
    status         text NOT NULL DEFAULT 'creating',
    owner_id       bigint REFERENCES users (id),
    hypervisor_id  bigint REFERENCES hypervisors (id),
    resources      jsonb NOT NULL DEFAULT '{}',
    network_config jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE api_keys (
    id         bigint PRIMARY KEY,
    user_id    bigint REFERENCES users (id),
    key_hash   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    action     text NOT NULL,
    details    jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE PUBLICATION novacron_migration
    FOR TABLE users, hypervisors, virtual_machines, api_keys, audit_log;
