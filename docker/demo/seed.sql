-- A few thousand NovaCron rows on blue, for the initial copy of the compose demo.
INSERT INTO users (id, email, name)
SELECT g, 'u' || g || '@' || (ARRAY['acme.example', 'globex.example', 'other.example'])[1 + g % 3], 'user ' || g
  FROM generate_series(1, 2000) AS g;
INSERT INTO hypervisors (id, hostname, status, type, capacity)
SELECT g, 'hv' || g, (ARRAY['active', 'inactive', 'maintenance'])[1 + g % 3], 'kvm',
       jsonb_build_object('cpu_cores', 32 + g % 32, 'memory_mb', 65536)
  FROM generate_series(1, 200) AS g;
INSERT INTO virtual_machines (id, name, status, owner_id, hypervisor_id, resources, network_config)
SELECT g, 'vm' || g, (ARRAY['creating', 'running', 'stopped', 'deleted'])[1 + g % 4], 1 + g % 2000, 1 + g % 200,
       jsonb_build_object('cpu_cores', 2, 'memory_mb', 2048, 'disk_gb', 20),
       jsonb_build_object('ip_address', '10.0.' || (g % 250) || '.' || (1 + g % 200))
  FROM generate_series(1, 10000) AS g;
INSERT INTO api_keys (id, user_id, key_hash) SELECT g, g, md5(g::text) FROM generate_series(1, 2000) AS g;
SELECT setval(pg_get_serial_sequence('users', 'id'), 2000);
SELECT setval(pg_get_serial_sequence('hypervisors', 'id'), 200);
SELECT setval(pg_get_serial_sequence('virtual_machines', 'id'), 10000);
SELECT setval(pg_get_serial_sequence('api_keys', 'id'), 2000);
