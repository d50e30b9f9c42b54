/**
 * The pre-chat form (UL3). Each field shows why it is asked (its purpose) right under it.
 * Personal fields appear only after consent was granted, and each has its own release box:
 * typing a value is not giving it, ticking "Send this to the organisation" is. A personal value
 * that was not released never leaves the browser.
 *
 * Checks here are for the visitor's convenience; the server checks the same rules again.
 */

import type { PreChatField } from "./gen/hafen/webchat/v1/webchat_pb";
import type { Shell } from "./shell";
import { busy, h, uid } from "./ui";

export interface FieldInput {
  key: string;
  value: string;
  released: boolean;
}

/** The longest value the server takes. */
const MAX_VALUE = 1000;

/** The form's heading and button: the pre-chat form's unless given. */
export interface FormTexts {
  title: string;
  submit: string;
}

/**
 * Builds the form for `fields` (already limited to what may be asked). `submit` gets the values
 * to send: the non-empty ones, personal ones only when released.
 */
export function fieldsForm(
  shell: Shell,
  fields: readonly PreChatField[],
  submit: (values: FieldInput[]) => Promise<void>,
  texts: FormTexts = { title: shell.t.fieldsTitle, submit: shell.t.start },
): HTMLFormElement {
  const t = shell.t;
  const textLang = shell.textLang || null;
  const titleId = uid("fields-title");
  const rows = fields.map((field, index) => {
    const inputId = uid(`field-${field.key}`);
    const purposeId = uid("purpose");
    const input = h("input", {
      id: inputId,
      type: inputType(field.key),
      autocomplete: autocomplete(field.key),
      maxlength: MAX_VALUE,
      "data-hafen": `field-${field.key}`,
      "aria-describedby": field.purpose ? purposeId : null,
      "aria-required": field.required ? "true" : null,
      "data-autofocus": index === 0,
    });
    const releaseId = uid(`release-${field.key}`);
    const release = field.personal
      ? h("input", { type: "checkbox", id: releaseId, "data-hafen": `release-${field.key}` })
      : null;
    const row = h(
      "div",
      { class: "field" },
      h(
        "label",
        { for: inputId },
        h("span", { lang: textLang }, field.label),
        field.required ? ` ${t.required}` : "",
      ),
      input,
      field.purpose && h("p", { class: "purpose", id: purposeId, lang: textLang }, field.purpose),
      release &&
        h("div", { class: "check" }, release, h("label", { for: releaseId }, t.release)),
    );
    return { field, input, release, row };
  });

  const button = h("button", { type: "submit", class: "primary", "data-hafen": "fields-submit" }, texts.submit);
  const form = h(
    "form",
    { class: "fields", novalidate: true, "aria-labelledby": titleId },
    h("h3", { id: titleId }, texts.title),
    ...rows.map((r) => r.row),
    h("div", { class: "actions" }, button),
  );

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values: FieldInput[] = [];
    for (const { field, input, release } of rows) {
      const value = input.value.trim();
      const released = release?.checked ?? false;
      let problem = "";
      if (field.required && value === "") {
        problem = field.personal ? t.fillInAndRelease(field.label) : t.fillIn(field.label);
      } else if (field.required && field.personal && !released) {
        problem = t.fillInAndRelease(field.label);
      }
      if (problem) {
        input.setAttribute("aria-invalid", "true");
        shell.status(problem, "error");
        (value === "" || !release ? input : release).focus();
        return;
      }
      input.removeAttribute("aria-invalid");
      if (value !== "" && (!field.personal || released)) {
        values.push({ key: field.key, value, released: field.personal });
      }
    }
    shell.status("");
    void busy(button, () => submit(values));
  });
  return form;
}

function inputType(key: string): string {
  if (key.includes("email")) {
    return "email";
  }
  return key.includes("phone") ? "tel" : "text";
}

/** Browser autofill for the common keys; the visitor still decides what is released. */
function autocomplete(key: string): string {
  if (key.includes("email")) {
    return "email";
  }
  if (key.includes("phone")) {
    return "tel";
  }
  return key === "name" ? "name" : "off";
}
