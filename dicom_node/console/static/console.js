// AnatomiX Node console: every action is a fetch to the operations API (/api/...) with the session
// cookie and its CSRF token; lists marked data-refresh replace themselves from the server every few
// seconds. No framework, no download: pages read without JavaScript.
'use strict';
(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || '';

  async function api(method, url, body) {
    const headers = { 'Accept': 'application/json' };
    if (method !== 'GET') headers['X-CSRF-Token'] = csrf();
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(url, { method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = response.status === 204 ? null : await response.json(); } catch (e) { data = null; }
    return { ok: response.ok, status: response.status, data };
  }

  function problemText(r) {
    if (r.status === 401 && !(r.data && r.data.detail)) return 'Your session has ended: log in again.';
    if (r.status === 403) return 'Your role may not do this' + (r.data && r.data.detail ? ': ' + r.data.detail : '.');
    return (r.data && (r.data.detail || r.data.title)) || ('The node answered ' + r.status);
  }

  // The element that shows an action's outcome: the nearest [data-result], outside self-updating regions.
  function resultFor(el) {
    const region = el.closest('[data-refresh]');
    let scope = el.parentElement;
    while (scope) {
      const found = scope.querySelector('[data-result]');
      if (found && !(region && region.contains(found))) return found;
      scope = scope.parentElement;
    }
    return null;
  }

  function show(target, text, ok) {
    if (!target) return;
    target.textContent = text;
    target.classList.toggle('ok', ok);
    target.classList.toggle('bad', !ok);
  }

  // ---- buttons: data-action="URL" [data-method] [data-body] [data-confirm] [data-reload] [data-echo]
  document.addEventListener('click', async (event) => {
    const button = event.target.closest('button[data-action], button[data-logout]');
    if (!button) return;
    event.preventDefault();
    if (button.hasAttribute('data-logout')) {
      await api('POST', '/api/auth/logout');
      window.location.href = '/console/login';
      return;
    }
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    const target = resultFor(button);
    const method = button.dataset.method || 'POST';
    const body = button.dataset.body ? JSON.parse(button.dataset.body) : (method === 'POST' ? {} : undefined);
    button.disabled = true;
    show(target, 'Working…', true);
    try {
      const r = await api(method, button.dataset.action, body);
      if (!r.ok) { show(target, problemText(r), false); return; }
      if (button.hasAttribute('data-reload')) { window.location.reload(); return; }
      // The self-updating regions reload before the outcome shows (the button leaves focus, which
      // otherwise holds a region still), so no list on the page contradicts the outcome.
      if (button.closest('[data-refresh]')) button.blur();
      await Promise.all([...document.querySelectorAll('[data-refresh]')].map((region) => region.refreshNow && region.refreshNow()));
      if (button.hasAttribute('data-echo')) {
        const d = r.data;
        show(target, d.success ? `Echo OK: ${d.rtt_ms} ms` : `Echo failed: ${d.error}`, d.success);
      } else if (r.data && Array.isArray(r.data.results)) {
        const good = r.data.results.filter((x) => x.ok).length;
        show(target, `${r.data.matched} studies: ${good} done` + (r.data.results.length ? ' — ' + r.data.results.map((x) => x.message).join('; ') : ''), good === r.data.results.length);
      } else if (r.data && r.data.password) {
        show(target, `One-time password for ${r.data.name}, shown once: ${r.data.password}`, true);
      } else if (r.data && 'message' in r.data) {
        show(target, r.data.message, r.data.ok);
      } else {
        show(target, 'Done.', true);
      }
    } catch (e) {
      show(target, 'The node did not answer: ' + e, false);
    } finally {
      button.disabled = false;
    }
  });

  // ---- forms: data-login, or data-api="URL" data-method data-next (JSON body from the fields)
  function formBody(form) {
    const body = {};
    for (const field of form.querySelectorAll('input[name], select[name], textarea[name]')) {
      if (field.hasAttribute('data-skip')) continue;
      const type = field.dataset.type;
      if (type === 'bool') { body[field.name] = field.checked; continue; }
      const value = field.value.trim();
      if (type === 'int') body[field.name] = /^-?\d+$/.test(value) ? Number(value) : value;
      else if (type === 'float') body[field.name] = value === '' ? null : (isNaN(Number(value)) ? value : Number(value));
      else if (type === 'optional') body[field.name] = value === '' ? null : value;
      else body[field.name] = value;
    }
    return body;
  }

  function clearErrors(form) {
    for (const el of form.querySelectorAll('[data-error-for]')) el.textContent = '';
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    const top = form.querySelector('[data-form-error]');
    if (top) { top.hidden = true; top.textContent = ''; }
  }

  function showErrors(form, r) {
    const names = [...form.querySelectorAll('[data-error-for]')].map((el) => el.dataset.errorFor);
    let placed = false;
    const errors = (r.data && r.data.errors) || [];
    for (const e of errors) {
      const name = names.find((n) => e.where === 'body.' + n || e.where.startsWith('body.' + n + '.'));
      if (name) { place(form, name, e.message); placed = true; }
    }
    if (!placed && r.data && r.data.detail) {  // the shared validation names the field in its message
      const name = names.find((n) => new RegExp('(^|[^a-z_])' + n + '([^a-z_]|$)').test(r.data.detail));
      if (name) { place(form, name, r.data.detail); placed = true; }
    }
    if (!placed) {
      const top = form.querySelector('[data-form-error]');
      if (top) { top.textContent = problemText(r); top.hidden = false; }
    }
  }

  function place(form, name, message) {
    const slot = form.querySelector(`[data-error-for="${name}"]`);
    const input = form.querySelector(`[name="${name}"]`);
    if (slot) slot.textContent = message;
    if (input) { input.setAttribute('aria-invalid', 'true'); }
  }

  document.addEventListener('submit', async (event) => {
    const form = event.target;
    if (!form.matches('form[data-login], form[data-api]:not([data-rule-form])')) return;
    event.preventDefault();
    clearErrors(form);
    const submit = form.querySelector('button[type="submit"]');
    if (submit) submit.disabled = true;
    try {
      if (form.hasAttribute('data-login')) {
        const r = await api('POST', '/api/auth/login', formBody(form));
        if (!r.ok) { showErrors(form, r); return; }
        window.location.href = form.dataset.next || '/console/';
        return;
      }
      const body = formBody(form);
      if (form.dataset.method === 'PATCH') delete body.name;
      const repeat = form.elements.repeat_password;
      if (repeat && repeat.value !== form.elements.new_password.value) {
        place(form, 'repeat_password', 'The two new passwords differ: type the same one twice.');
        repeat.focus();
        return;
      }
      const r = await api(form.dataset.method || 'POST', form.dataset.api, body);
      if (!r.ok) {
        showErrors(form, r);
        const bad = form.querySelector('[aria-invalid="true"]');
        if (bad) bad.focus();
        return;
      }
      if (form.hasAttribute('data-show-secret')) {  // a token or one-time password: shown once, here
        const out = form.querySelector('[data-secret]');
        const secret = r.data && (r.data.token || r.data.password);
        out.textContent = r.data.token ? `Token "${r.data.label}", shown only now: copy it: ${secret}`
          : `Account ${r.data.name} added. One-time password, shown only now: ${secret}`;
        out.hidden = false;
        for (const field of form.querySelectorAll('input[name]')) field.value = '';
        return;
      }
      window.location.href = form.dataset.next || window.location.href;
    } finally {
      if (submit) submit.disabled = false;
    }
  });

  // ---- routing rules: the form's fields named match.<condition> (comma-separated), action.<field>;
  // the API's errors [{field: 'match.modality[0]', message}] go next to the field they name.
  function ruleBody(form) {
    const body = { name: form.elements.name.value.trim(), description: form.elements.description.value.trim(), match: {}, action: { destinations: [] } };
    for (const field of form.querySelectorAll('input[name], select[name]')) {
      const [group, key] = field.name.split('.');
      if (!key) { if (field.dataset.type === 'bool') body[field.name] = field.checked; continue; }
      if (group === 'match') {
        const values = field.value.split(',').map((v) => v.trim()).filter((v) => v !== '');
        if (values.length) body.match[key] = values;
      } else if (key === 'destinations') {
        if (field.checked) body.action.destinations.push(field.value);
      } else if (field.dataset.type === 'bool') {
        body.action[key] = field.checked;
      } else {
        body.action[key] = field.value === '' ? null : field.value;
      }
    }
    return body;
  }

  function showRuleErrors(form, r) {
    const slots = new Map([...form.querySelectorAll('[data-error-for]')].map((el) => [el.dataset.errorFor, el]));
    const unplaced = [];
    for (const e of (r.data && r.data.errors) || []) {
      const key = String(e.field || '').replace(/\[\d+\]$/, '');
      const slot = slots.get(key);
      if (!slot) { unplaced.push(`${e.field}: ${e.message}`); continue; }
      slot.textContent = slot.textContent ? slot.textContent + ' ' + e.message : e.message;
      const input = form.querySelector(`[name="${key}"]:not([type="checkbox"])`) || form.querySelector(`[name="${key}"]`);
      if (input) input.setAttribute('aria-invalid', 'true');
    }
    if (r.status === 409 && slots.get('name')) { slots.get('name').textContent = problemText(r); form.elements.name.setAttribute('aria-invalid', 'true'); }
    else if (unplaced.length || !(r.data && r.data.errors && r.data.errors.length)) {
      const top = form.querySelector('[data-form-error]');
      if (top) { top.textContent = unplaced.length ? unplaced.join('; ') : problemText(r); top.hidden = false; }
    }
  }

  document.addEventListener('submit', async (event) => {
    const form = event.target;
    if (!form.matches('form[data-rule-form]')) return;
    event.preventDefault();
    clearErrors(form);
    const submit = form.querySelector('button[type="submit"]');
    if (submit) submit.disabled = true;
    try {
      const r = await api(form.dataset.method || 'POST', form.dataset.api, ruleBody(form));
      if (!r.ok) {
        showRuleErrors(form, r);
        const bad = form.querySelector('[aria-invalid="true"]') || form.querySelector('[data-form-error]:not([hidden])');
        if (bad) { if (!bad.hasAttribute('tabindex') && bad.matches('p')) bad.setAttribute('tabindex', '-1'); bad.focus(); }
        return;
      }
      window.location.href = form.dataset.next || window.location.href;
    } catch (e) {
      const top = form.querySelector('[data-form-error]');
      if (top) { top.textContent = 'The node did not answer: ' + e; top.hidden = false; }
    } finally {
      if (submit) submit.disabled = false;
    }
  });

  // ---- the routing dry run: which rule a study matches, why, and where its results would go
  document.addEventListener('submit', async (event) => {
    const form = event.target;
    if (!form.matches('form[data-dry-run]')) return;
    event.preventDefault();
    clearErrors(form);
    const out = document.querySelector('[data-dry-run-result]');
    const submit = form.querySelector('button[type="submit"]');
    if (submit) submit.disabled = true;
    try {
      const uid = form.elements.study_instance_uid.value.trim();
      const r = await api('POST', '/api/routing-rules/dry-run', { study_instance_uid: uid === '' ? null : uid });
      if (!r.ok) {
        out.hidden = true;
        const top = form.querySelector('[data-form-error]');
        top.textContent = problemText(r); top.hidden = false;
        return;
      }
      const lines = out.querySelector('[data-explanation]');
      const dests = out.querySelector('[data-destinations]');
      lines.replaceChildren(...r.data.explanation.map((line) => { const li = document.createElement('li'); li.textContent = line; return li; }));
      const chosen = r.data.destinations.map((d) => { const li = document.createElement('li'); li.textContent = `${d.name} (profile ${d.profile}): ${d.reason}`; return li; });
      if (!chosen.length) { const li = document.createElement('li'); li.textContent = 'no destination'; chosen.push(li); }
      dests.replaceChildren(...chosen);
      out.dataset.rule = r.data.rule || '';
      out.hidden = false;
    } catch (e) {
      const top = form.querySelector('[data-form-error]');
      top.textContent = 'The node did not answer: ' + e; top.hidden = false;
    } finally {
      if (submit) submit.disabled = false;
    }
  });

  // ---- self-updating regions: data-refresh="URL" data-interval="ms"
  function refresh(region) {
    const every = Number(region.dataset.interval || 3000);
    const load = async (forced) => {
      if (forced || (!document.hidden && !region.contains(document.activeElement))) {
        try {
          const response = await fetch(region.dataset.refresh, { credentials: 'same-origin', headers: { 'Accept': 'text/html' } });
          if (response.ok) {
            const html = await response.text();
            if (html !== region.dataset.last) {
              region.dataset.last = html;
              const fresh = document.createElement('div');
              fresh.innerHTML = html;
              if (fresh.innerHTML !== region.innerHTML) { region.innerHTML = fresh.innerHTML; sizeBars(region); }
            }
          }
        } catch (e) { /* node unreachable for a moment: keep what is shown */ }
      }
    };
    const tick = async () => { await load(false); setTimeout(tick, every); };
    region.refreshNow = () => load(true);
    setTimeout(tick, every);
  }

  function sizeBars(root) {
    for (const bar of root.querySelectorAll('[data-width]')) bar.style.width = Math.min(100, Number(bar.dataset.width)) + '%';
  }

  document.addEventListener('DOMContentLoaded', () => {
    sizeBars(document);
    document.querySelectorAll('[data-refresh]').forEach(refresh);
  });
})();
